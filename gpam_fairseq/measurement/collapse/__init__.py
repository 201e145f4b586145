"""Rank collapse and gradient diagnostics per layer, for one or several attention types.

The measurement, one concern per module:

* :mod:`.metrics`: the residual ratio, the mean cosine similarity and the state RMS of one batch;
* :mod:`.measure`: a fairseq model (trained checkpoint or random initialisation) or a stack of
  attention only, measured layer by layer in one forward/backward pass;
* :mod:`.grid`: the attention settings to measure and the (lambda+, lambda-) grid of the lambda map;
* :mod:`.trained`: the lambdas of trainable-lambda checkpoints;
* :mod:`.output`: the CSV files and the per-layer curves;
* :mod:`.lambda_map`: the lambda map's summary, text tables and heat maps;
* :mod:`.cli`: the command line of ``scripts/analyze_collapse.py`` (:func:`.cli.main`), whose
  :func:`.cli.run` the PTB controlled experiment (``examples/ptb/controlled/run_controlled.py``)
  calls on its trained checkpoints.
"""
