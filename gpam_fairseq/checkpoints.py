"""Loading checkpoints in our scripts: one place, torch's weights_only protection kept on.

Every script of this project (comparison, analysis, benchmark, checkpoint averaging, hub
loading in the examples) loads checkpoints through these functions, so that the allowlist
of :mod:`gpam_fairseq.compat` is the only thing that decides what a checkpoint may unpickle.

Before fairseq opens a file, its pickle is scanned (``torch.serialization.
get_unsafe_globals_in_checkpoint`` reads the opcodes, it runs nothing); a file that names a
global outside the allowlist is refused with :class:`CheckpointRefused`, one line naming the
file and the global. torch's own ``weights_only`` unpickler stays the barrier behind that
scan, and its refusals are reworded the same way.
"""

import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import checkpoint_utils

from gpam_fairseq.compat import allow_fairseq_checkpoints


class CheckpointRefused(pickle.UnpicklingError):
    """A checkpoint pickles a global outside the allowlist; nothing of it was executed."""


def _refusal(path: str, offending: str) -> CheckpointRefused:
    return CheckpointRefused(
        f"refused to load {path}: it pickles {offending}, which is not on gpam_fairseq's "
        "checkpoint allowlist (gpam_fairseq/compat.py); nothing in it was executed. Use only "
        "checkpoints from a source you trust; to inspect this one, list its globals with "
        "torch.serialization.get_unsafe_globals_in_checkpoint(path)"
    )


def _unsafe_globals(path: str) -> List[str]:
    """The globals the file's pickle names outside the allowlist (a scan, no execution)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:  # torch < 2.5: torch.load's own refusal still applies
        return []
    try:
        return list(scan(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError):
        return []  # not a zip checkpoint (legacy format): left to torch.load's own refusal


def check_checkpoint(path: str) -> None:
    """Raise CheckpointRefused if the file pickles a global outside the allowlist."""
    allow_fairseq_checkpoints()
    unsafe = _unsafe_globals(path)
    if unsafe:
        names = ", ".join(sorted(unsafe))
        raise _refusal(path, f"the global{'s' if len(unsafe) > 1 else ''} {names}")


def _torch_refusal(path: str, err: pickle.UnpicklingError) -> CheckpointRefused:
    # torch's message spans several lines; keep the one that names the global
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    detail = next((line for line in lines if "GLOBAL" in line), lines[-1])
    return _refusal(path, f"something torch refused ({detail})")


def load_state(path: str, arg_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint's dictionary (model weights, cfg, optimizer history) on the CPU."""
    check_checkpoint(path)
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except CheckpointRefused:
        raise
    except pickle.UnpicklingError as err:
        raise _torch_refusal(path, err) from None


def load_models(
    paths: Sequence[str], arg_overrides: Optional[Dict[str, Any]] = None, task=None
) -> Tuple[List[Any], Any, Any]:
    """(models, cfg, task) as fairseq-generate builds them."""
    paths = list(paths)
    for path in paths:
        check_checkpoint(path)
    try:
        return checkpoint_utils.load_model_ensemble_and_task(
            paths, arg_overrides=arg_overrides, task=task
        )
    except CheckpointRefused:
        raise
    except pickle.UnpicklingError as err:
        raise _torch_refusal(", ".join(paths), err) from None
