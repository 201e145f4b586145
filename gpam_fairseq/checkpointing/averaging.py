"""Averaging the parameters of several fairseq checkpoints (fairseq-fixed ships no such script).

The core of ``scripts/average_checkpoints.py`` (same interface as fairseq's script of that
name) and of the recipes' evaluate stage (``AVERAGE=N``). Each file is read as fairseq's script
reads it, a plain ``torch.load`` of a dictionary holding a ``"model"`` state dict, so a file saved
as ``torch.save({"model": model.state_dict()}, path)`` averages as well as a fairseq-train
checkpoint; but with torch's weights_only loading and the plugin's allowlist
(:func:`gpam_fairseq.checkpointing.checkpoints.check_checkpoint` names a refused file). Floating-point tensors are averaged in fp32 (fp16 ones are upcast first, as
fairseq does), integer tensors by floor division. The output keeps the first input's
configuration and training state, so fairseq-generate and fairseq-train load it as usual
(pass --user-dir gpam_fairseq for our models).

The command line of ``scripts/average_checkpoints.py`` is :func:`main`:

    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-epoch-checkpoints 10 --output avg.pt
    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-update-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt
"""

import argparse
import collections
import os
import re
from typing import List, Optional, Sequence


from gpam_fairseq.checkpointing.checkpoints import CheckpointError


class CheckpointAveragingError(CheckpointError):
    """The checkpoints asked for cannot be averaged; the message names the flag or file at fault."""


def last_n_checkpoints(folder: str, n: int, update_based: bool, upper_bound: Optional[int] = None) -> List[str]:
    """The n newest checkpointN.pt (epochs) or checkpoint_E_U.pt (updates) of a folder."""
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    entries = []
    for name in os.listdir(folder):
        m = pattern.fullmatch(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            entries.append((int(m.group(1)), name))
    if len(entries) < n:
        kind = "checkpoint_<epoch>_<update>.pt" if update_based else "checkpoint<epoch>.pt"
        raise CheckpointAveragingError(
            f"--inputs {folder}: found {len(entries)} {kind} files, need {n} "
            f"(lower --num-{'update' if update_based else 'epoch'}-checkpoints)")
    return [os.path.join(folder, name) for _, name in sorted(entries, reverse=True)[:n]]


def read_state(path: str) -> dict:
    """The dictionary saved in ``path``, as it was saved (no fairseq upgrade: a bare
    ``{"model": state_dict}`` has no ``best_loss`` or ``cfg`` and needs none); it must hold
    ``"model"``, a dictionary of tensors."""
    from gpam_fairseq.checkpointing.checkpoints import load_saved

    state = load_saved(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointAveragingError(
            f"{path}: holds no \"model\" dictionary of parameters; pass fairseq checkpoints or files saved as "
            f"torch.save({{\"model\": model.state_dict()}}, path)")
    return state


def average_checkpoints(paths: Sequence[str]) -> dict:
    """The first checkpoint's state with "model" replaced by the parameter average of all."""
    import torch
    from omegaconf import OmegaConf

    sums, keys, new_state = collections.OrderedDict(), None, None
    for i, path in enumerate(paths):
        print(f"  [{i + 1}/{len(paths)}] {path}", flush=True)
        state = read_state(path)
        if new_state is None:
            new_state = state
        params = state["model"]
        if keys is None:
            keys = list(params)
        elif list(params) != keys:
            raise CheckpointAveragingError(
                f"{path}: its parameter names differ from {paths[0]}'s; average checkpoints of one run")
        for k in keys:
            p = params[k]
            p = p.float() if p.dtype == torch.float16 else p
            sums[k] = p.clone() if k not in sums else sums[k] + p
    for k, v in sums.items():
        sums[k] = v / len(paths) if v.is_floating_point() else torch.div(v, len(paths), rounding_mode="floor")
    new_state["model"] = sums
    if OmegaConf.is_config(new_state.get("cfg")):  # as fairseq's trainer saves it: plain containers
        new_state["cfg"] = OmegaConf.to_container(new_state["cfg"])
    return new_state


def average_and_save(paths: Sequence[str], output: str) -> None:
    """Average ``paths`` into the checkpoint file ``output``, saying what it does."""
    print(f"averaging {len(paths)} checkpoints -> {output}", flush=True)
    state = average_checkpoints(paths)

    from fairseq.checkpoint_utils import torch_persistent_save

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch_persistent_save(state, output)
    print(f"wrote {output}", flush=True)


def main(argv=None) -> List[str]:
    """The command line of scripts/average_checkpoints.py; returns the checkpoints it averaged."""
    parser = argparse.ArgumentParser(
        description="Average the parameters of several fairseq checkpoints (fairseq-fixed ships no such script).")
    parser.add_argument("--inputs", required=True, nargs="+", help="checkpoint files, or one folder with "
                        "--num-epoch-checkpoints / --num-update-checkpoints")
    parser.add_argument("--output", required=True, metavar="FILE", help="where the averaged checkpoint goes")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int, help="average the last N checkpoint<epoch>.pt of --inputs")
    group.add_argument("--num-update-checkpoints", type=int, help="average the last N checkpoint_<epoch>_<update>.pt")
    parser.add_argument("--checkpoint-upper-bound", type=int, help="ignore checkpoints after this epoch/update")
    args = parser.parse_args(argv)

    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    if n is not None:
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            parser.error("--num-epoch-checkpoints/--num-update-checkpoints need one folder in --inputs")
        paths = last_n_checkpoints(args.inputs[0], n, args.num_update_checkpoints is not None,
                                   args.checkpoint_upper_bound)
    else:
        paths = args.inputs
        for p in paths:
            if not os.path.exists(p):
                parser.error(f"--inputs {p}: no such file")
            if not os.path.isfile(p):
                parser.error(f"--inputs {p}: not a checkpoint file (a folder needs --num-epoch-checkpoints N)")
    # a checkpoint that cannot be averaged ends the program with one line naming it (and
    # nothing is written): gpam_fairseq's error hook, installed when the package is imported
    average_and_save(paths, args.output)
    return paths
