"""Kernels, saved bytes, speed and memory of every attention we ship, next to stock fairseq.

The benchmark of ``scripts/benchmark.py``, one concern per module:

* :mod:`.inputs`: the settings measured (the paper's setups at full size and a tiny ``--quick``
  version), the models fairseq-train builds for them, their masks and random batches;
* :mod:`.ops`: the ``ops`` level, kernels launched and bytes kept for the backward pass, counted
  per attention role and per whole training step (deterministic, any device);
* :mod:`.timed`: the timed levels ``core``, ``attention``, ``train`` and ``beam``, their variants
  and the interleaved timing of one group;
* :mod:`.report`: the progress lines, the CSV files, the Markdown tables and the plot;
* :mod:`.cli`: the command line (:func:`.cli.main`), which checks the flags and runs the levels.
"""
