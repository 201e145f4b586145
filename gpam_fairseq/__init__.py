"""gpam_fairseq: generalized probabilistic attention (daGPAM) for fairseq.

Use with ``--user-dir gpam_fairseq`` on the stock fairseq command lines, or import it
before building or loading a model from Python. Importing registers the
``transformer_gpam`` and ``transformer_lm_gpam`` models and their architectures.
"""

from gpam_fairseq import checkpoint_glue, cli_errors
from gpam_fairseq.compat import allow_fairseq_checkpoints, restore_numpy_compat_long

allow_fairseq_checkpoints()
restore_numpy_compat_long()  # fairseq-fixed's LM datasets under NumPy 2
cli_errors.install()  # a bad option or checkpoint ends a program with one line, not a traceback
checkpoint_glue.install()  # fairseq's checkpoint loads diagnosed, its saves atomic

# fairseq auto-imports models/ only when --user-dir is the first import of this package
from gpam_fairseq.models import transformer_gpam, transformer_lm_gpam  # noqa: E402,F401

__version__ = "0.1.0"
