"""The few differences between fairseq releases and torch versions, in one place."""

import argparse

import torch

# torch >= 2.6 loads checkpoints with weights_only=True. fairseq's NMT checkpoints pickle
# their argparse.Namespace of options (dataclass-config models pickle plain containers).
# Allow exactly that type, instead of TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which would turn
# the protection off for every global.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no allowlist (and no weights_only default)
        add_safe_globals(CHECKPOINT_SAFE_GLOBALS)
