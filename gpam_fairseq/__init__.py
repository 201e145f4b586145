"""gpam_fairseq: generalized probabilistic attention (daGPAM) for fairseq.

Use with ``--user-dir gpam_fairseq`` on the stock fairseq command lines, or import it
before building or loading a model from Python. Importing registers the
``transformer_gpam`` and ``transformer_lm_gpam`` models and their architectures.
"""

import contextlib
import logging
import sys
import warnings


@contextlib.contextmanager
def _quiet_first_fairseq_import():
    """Importing fairseq the first time in a process prints lines that are not ours and ask
    nothing of the user: fairscale's FutureWarnings about ``torch.cuda.amp`` (fairscale is
    installed for ``--ddp-backend fully_sharded``) and "Please install tensorboardX" from
    fairseq's text-to-speech task. The demo, the recipes and the scripts import fairseq through
    this package and run fairseq's command lines with their output in log files: keep those
    lines off their console. Where fairseq is already imported (its own command lines with
    ``--user-dir``) this does nothing."""
    if "fairseq" in sys.modules:
        yield
        return
    tts_logger = logging.getLogger("fairseq.tasks.text_to_speech")
    level = tts_logger.level
    tts_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"fairscale\.")
            yield
    finally:
        tts_logger.setLevel(level)


with _quiet_first_fairseq_import():
    from gpam_fairseq.checkpointing import glue as checkpoint_glue
    from gpam_fairseq.fairseq_glue import cli_errors, evaluation, precision
    from gpam_fairseq.fairseq_glue.compat import allow_fairseq_checkpoints, restore_numpy_compat_long

    allow_fairseq_checkpoints()
    restore_numpy_compat_long()  # fairseq-fixed's LM datasets under NumPy 2
    cli_errors.install()  # a bad option or checkpoint ends a program with one line, not a traceback
    checkpoint_glue.install()  # fairseq's checkpoint loads diagnosed, its saves atomic
    precision.install()  # --bf16 as bf16 autocast on CPUs and GPUs; --fp16/--amp refused on a CPU in one line
    evaluation.install()  # validation, -validate, -generate, -eval-lm use every sentence of their subsets

    # fairseq auto-imports models/ only when --user-dir is the first import of this package
    from gpam_fairseq.models import transformer_gpam, transformer_lm_gpam  # noqa: F401

__version__ = "0.1.0"
