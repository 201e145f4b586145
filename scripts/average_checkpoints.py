#!/usr/bin/env python
"""Average the parameters of several fairseq checkpoints (fairseq-fixed ships no such script).

Same interface as fairseq's scripts/average_checkpoints.py:

    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-epoch-checkpoints 10 --output avg.pt
    python scripts/average_checkpoints.py --inputs CKPT_DIR --num-update-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt

Each file is read as fairseq's script reads it (a dictionary holding a "model" state dict:
fairseq-train checkpoints, or bare torch.save({"model": model.state_dict()}, path) files), with
torch's weights_only loading and the plugin's allowlist; floating-point tensors are averaged in fp32 (fp16 ones
are upcast first, as fairseq does), integer tensors by floor division. The output keeps the
first input's configuration and training state, so fairseq-generate and fairseq-train load it
as usual (pass --user-dir gpam_fairseq for our models). The averaging itself is
gpam_fairseq/checkpointing/averaging.py.
"""

import argparse
import os

from gpam_fairseq.checkpointing.averaging import average_and_save, average_checkpoints, last_n_checkpoints  # noqa: F401
# (average_checkpoints(paths) -> state: the function fairseq's script of this name exports)


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
    # a checkpoint that cannot be averaged ends the program with one line naming it (and
    # nothing is written): gpam_fairseq's error hook, installed when the package is imported
    average_and_save(paths, args.output)
    return paths


if __name__ == "__main__":
    main()
