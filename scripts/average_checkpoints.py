#!/usr/bin/env python
"""Average the parameters of several fairseq checkpoints (fairseq-fixed ships no such script).

Same interface as fairseq's scripts/average_checkpoints.py:

    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-epoch-checkpoints 10 --output avg.pt
    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-update-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt

Checkpoints are read through gpam_fairseq.checkpoints.load_state (torch's weights_only
loading with the plugin's allowlist), floating-point tensors are averaged in fp32 (fp16 ones
are upcast first, as fairseq does), integer tensors by floor division. The output keeps the
first input's configuration and training state, so fairseq-generate and fairseq-train load it
as usual (pass --user-dir gpam_fairseq for our models).
"""

import argparse
import collections
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def last_n_checkpoints(folder, n, update_based, upper_bound=None):
    """The n newest checkpointN.pt (epochs) or checkpoint_E_U.pt (updates) of a folder."""
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    entries = []
    for name in os.listdir(folder):
        m = pattern.fullmatch(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            entries.append((int(m.group(1)), name))
    if len(entries) < n:
        kind = "checkpoint_<epoch>_<update>.pt" if update_based else "checkpoint<epoch>.pt"
        raise SystemExit(f"--inputs {folder}: found {len(entries)} {kind} files, need {n} "
                         f"(lower --num-{'update' if update_based else 'epoch'}-checkpoints)")
    return [os.path.join(folder, name) for _, name in sorted(entries, reverse=True)[:n]]


def average_checkpoints(paths):
    """The first checkpoint's state with "model" replaced by the parameter average of all."""
    import torch
    from omegaconf import OmegaConf

    from gpam_fairseq.checkpoints import CheckpointError, load_state

    sums, keys, new_state = collections.OrderedDict(), None, None
    for i, path in enumerate(paths):
        print(f"  [{i + 1}/{len(paths)}] {path}", flush=True)
        state = load_state(path)
        if new_state is None:
            new_state = state
        params = state["model"]
        if keys is None:
            keys = list(params)
        elif list(params) != keys:
            raise CheckpointError(f"{path}: its parameter names differ from {paths[0]}'s; average checkpoints of one run")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    print(f"averaging {len(paths)} checkpoints -> {args.output}", flush=True)
    state = average_checkpoints(paths)

    from fairseq.checkpoint_utils import torch_persistent_save

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch_persistent_save(state, args.output)
    print(f"wrote {args.output}", flush=True)
    return paths


if __name__ == "__main__":
    main()
