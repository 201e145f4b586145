"""λ sweeps: a grid of daGPAM settings × seeds for one recipe, through the recipe's own stages.

Every cell of the grid is one recipe run (the train and evaluate stages of
:mod:`gpam_fairseq.recipes.stages`, with MODEL, SEED, RUN_NAME and GPAM_ARGS set for it) in
the sweep's folder: ``<out>/runs/<run>`` (run folders as the recipes write them) and
``<out>/checkpoints/<run>``. The baseline (and, if asked, baseline_params / baseline_maps) runs
with the same seeds are cells too, so that the table and the plot are computed from runs.

A cell is *done* when its run folder holds a finished evaluation of a training whose
``--max-update`` is the sweep's: it is skipped. A cell whose training was interrupted resumes
from its ``checkpoint_last.pt`` (fairseq's own resume: same ``--save-dir``); one trained to a
smaller ``--max-update`` than the sweep's is trained on from its last checkpoint to the new one
and evaluated again. The cells run in this process one after the other, in ``--parallel N``
worker processes (one per visible GPU, ``CUDA_VISIBLE_DEVICES`` set for each), or as a job
array through submitit (``--slurm``); results are read from the run folders whichever ran them.

The cell function is :func:`run_cell`: it takes a JSON-able spec (recipe, environment, target
updates) and returns what it did, so that submitit can pickle it by reference.

The modules, by concern: :mod:`.grid` (the settings × seeds, the cells and their status, one cell's
run), :mod:`.runners` (in process, parallel worker processes, submitit), :mod:`.report` (the table
and the plot), :mod:`.cli` (the command line; ``python -m gpam_fairseq.recipes.sweep``).
"""

from gpam_fairseq.recipes.sweep.cli import EPILOG, main, parser  # noqa: F401
from gpam_fairseq.recipes.sweep.grid import (  # noqa: F401
    PASSED_ON, QUICK_LM, QUICK_MAX_UPDATE, QUICK_NMT, Cell, GridSystem, build_cells, cell_environment, cell_status,
    grid_settings, run_cell)
from gpam_fairseq.recipes.sweep.report import best_valid_loss, collect, metric_of, plot, write_tables  # noqa: F401
from gpam_fairseq.recipes.sweep.runners import (  # noqa: F401
    GridProgress, run_in_process, run_parallel, run_submitit, visible_gpus)
