"""The few differences between fairseq releases and torch versions, in one place.

torch >= 2.6 loads with ``weights_only=True``: only tensors, plain containers and the
globals on an allowlist may be unpickled. fairseq unpickles in two places:

* ``checkpoint_utils.load_checkpoint_to_cpu``: our checkpoints and stock ones. NMT
  (argparse-configured) models pickle their options as an ``argparse.Namespace``;
  dataclass-configured models (language models) pickle plain containers only.
* ``distributed.utils.broadcast_object``: when training resumes on several ranks, rank 0
  loads the checkpoint and sends it to the others with ``torch.save``/``torch.load``. By then
  its ``cfg`` is an omegaconf ``DictConfig`` (with ``ListConfig`` children, ``AnyNode``
  leaves, their ``Metadata``/``ContainerMetadata``, whose fields hold ``typing.Any``, the
  types ``dict``/``list``/``int`` and a ``collections.defaultdict`` resolver cache), and its
  tensors are replaced by fairseq's ``_TensorPlaceholder``.

:data:`CHECKPOINT_SAFE_GLOBALS` is exactly that list, found by listing the globals of real
checkpoints (NMT, LM, adaptive LM, trainable lambda, ``--memory-efficient-fp16``) and of their
broadcast payloads (``tests/test_security.py`` re-derives it). Nothing else is allowed: no
module-wide allowance, no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""

import argparse
import collections
import sys
import typing

import torch


def checkpoint_safe_globals() -> list:
    """The globals fairseq pickles in checkpoints and in broadcast_object payloads."""
    safe = [argparse.Namespace]  # NMT checkpoints: cfg["model"] is the argparse Namespace
    try:  # the broadcast payload of a resumed distributed run
        from fairseq.distributed.utils import _TensorPlaceholder
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.dictconfig import DictConfig
        from omegaconf.listconfig import ListConfig
        from omegaconf.nodes import AnyNode
    except ImportError:  # fairseq 0.12.2 / older omegaconf: the checkpoint part still applies
        return safe
    return safe + [
        DictConfig,
        ListConfig,
        AnyNode,
        Metadata,
        ContainerMetadata,
        typing.Any,
        dict,
        list,
        int,
        collections.defaultdict,
        _TensorPlaceholder,
    ]


CHECKPOINT_SAFE_GLOBALS = checkpoint_safe_globals()


def allow_fairseq_checkpoints() -> None:
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no allowlist (and no weights_only default)
        add_safe_globals(CHECKPOINT_SAFE_GLOBALS)


def restore_numpy_compat_long() -> None:
    """fairseq-fixed 0.12.3.1 still spells ``np.compat.long`` (TokenBlockDataset with
    ``--sample-break-mode eos``, which every LM hub's sample/generate/score and eos-broken LM
    training and evaluation use; LanguagePairDataset.num_tokens_vec). NumPy 2 removed
    ``numpy.compat``; give back that one name, ``np.int64`` as in NumPy 1, and only when it is
    missing."""
    import types

    import numpy as np

    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)


def refuse_fully_sharded_without_cuda() -> None:
    """Called by our models' ``build_model``. With ``--ddp-backend fully_sharded`` fairseq
    builds the model inside fairscale's ``enable_wrap`` and then wraps it in fairscale's
    FullyShardedDataParallel, whose constructor moves a tensor to CUDA (fairseq passes no
    ``compute_device``): on a machine without CUDA the run dies deep inside fairscale with
    ``AssertionError: Torch not compiled with CUDA enabled`` (or, with one process, asks for a
    process group). Stop before that, naming the flag. Without fairscale installed fairseq
    stops earlier, with its own ``pip install fairscale`` message, and this never runs."""
    auto_wrap = sys.modules.get("fairscale.nn.wrap.auto_wrap")
    if auto_wrap is None or not auto_wrap.ConfigAutoWrap.in_autowrap_context or torch.cuda.is_available():
        return
    from gpam_fairseq.options import GPAMConfigError

    raise GPAMConfigError(
        "--ddp-backend fully_sharded needs a CUDA GPU: fairscale's FullyShardedDataParallel, which "
        "fairseq wraps around the model, runs only on CUDA devices; on this machine drop the flag "
        "(the default --ddp-backend pytorch_ddp runs on a CPU)"
    )
