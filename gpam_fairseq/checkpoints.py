"""Loading checkpoints in our scripts: one place, torch's weights_only protection kept on.

Every script of this project (comparison, analysis, benchmark, checkpoint averaging, hub
loading in the examples) loads checkpoints through these functions, so that the allowlist
of :mod:`gpam_fairseq.compat` is the only thing that decides what a checkpoint may unpickle.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

from fairseq import checkpoint_utils

from gpam_fairseq.compat import allow_fairseq_checkpoints


def load_state(path: str, arg_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint's dictionary (model weights, cfg, optimizer history) on the CPU."""
    allow_fairseq_checkpoints()
    return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)


def load_models(
    paths: Sequence[str], arg_overrides: Optional[Dict[str, Any]] = None, task=None
) -> Tuple[List[Any], Any, Any]:
    """(models, cfg, task) as fairseq-generate builds them."""
    allow_fairseq_checkpoints()
    return checkpoint_utils.load_model_ensemble_and_task(
        list(paths), arg_overrides=arg_overrides, task=task
    )
