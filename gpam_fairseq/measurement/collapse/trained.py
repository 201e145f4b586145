"""The lambdas of trainable-lambda checkpoints (lambda = softplus(theta), converted by daGPAM's
own module), per module or per head, read from checkpoint files or run folders."""

import json
import os
from typing import List, Sequence, Tuple

import torch

from gpam_fairseq.options import GPAMOptions

THETA_SUFFIXES = (".mechanism.lambda_pos_theta", ".mechanism.lambda_neg_theta")
TRAINED_FIELDS = ["checkpoint", "module", "head", "theta_pos", "theta_neg", "lambda_pos", "lambda_neg", "row_sum"]


def checkpoints_in(path: str) -> List[str]:
    """The checkpoint files that ``path`` names: a file; a folder holding checkpoint_best.pt (else
    checkpoint_last.pt), as fairseq's --save-dir does; a recipe run folder (its .train.done
    records the training command and so its --save-dir); or a folder with such folders below
    it, like the PTB controlled run (ckpt/<type>/checkpoint_best.pt). Raises CheckpointError."""
    from gpam_fairseq.checkpointing.checkpoints import CheckpointError

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder (--trained-lambda takes checkpoints or run folders)", path)

    def own(folder):
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        return None

    if own(path):
        return [own(path)]
    marker = os.path.join(path, ".train.done")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            command = json.load(f).get("command") or []
        if "--save-dir" in command[:-1]:
            save_dir = command[command.index("--save-dir") + 1]
            if own(save_dir):
                return [own(save_dir)]
            raise CheckpointError(f"{path}: the run's --save-dir {save_dir} holds no checkpoint_best.pt or "
                                  "checkpoint_last.pt", path)
    found = []
    for folder, subfolders, _ in os.walk(path):
        subfolders.sort()
        if own(folder):
            found.append(own(folder))
    if not found:
        raise CheckpointError(f"{path}: no checkpoint_best.pt or checkpoint_last.pt in it or below it, and no "
                              ".train.done naming a --save-dir", path)
    return found


def lambdas_from_thetas(theta_pos: torch.Tensor, theta_neg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lambda+, lambda-) per value of the thetas, converted by daGPAM's own module
    (DaGPAMMechanism.lambdas: softplus in the thetas' accumulation dtype), not by a copy of it."""
    from torch import nn

    from gpam_fairseq.attention.mechanisms import DaGPAMMechanism

    n = theta_pos.numel()
    if theta_neg.numel() != n:
        raise ValueError(f"lambda thetas of different sizes: {n} and {theta_neg.numel()}")
    options = GPAMOptions(trainable_lambda=True, lambda_scope="head" if n > 1 else "module")
    mechanism = DaGPAMMechanism(num_heads=n, head_dim=1, options=options)
    mechanism.lambda_pos_theta = nn.Parameter(theta_pos.detach().clone().reshape(n), requires_grad=False)
    mechanism.lambda_neg_theta = nn.Parameter(theta_neg.detach().clone().reshape(n), requires_grad=False)
    with torch.no_grad():
        pos, neg = mechanism.lambdas()
    return pos.flatten(), neg.flatten()


def read_trained_lambdas(checkpoint: str) -> List[dict]:
    """One row per attention module (per head with --gpam-lambda-scope head) whose lambdas the
    checkpoint holds as trainable thetas: the thetas and lambda = softplus(theta). [] if none."""
    from gpam_fairseq.checkpointing.checkpoints import load_state

    model = load_state(checkpoint)["model"]
    rows = []
    for key in sorted(model):
        if not key.endswith(THETA_SUFFIXES[0]):
            continue
        module = key[: -len(THETA_SUFFIXES[0])]
        neg_key = module + THETA_SUFFIXES[1]
        if neg_key not in model:
            raise ValueError(f"{checkpoint}: {key} has no {neg_key}")
        theta_pos, theta_neg = model[key].flatten(), model[neg_key].flatten()
        lam_pos, lam_neg = lambdas_from_thetas(theta_pos, theta_neg)
        per_head = theta_pos.numel() > 1
        for h in range(theta_pos.numel()):
            rows.append(dict(checkpoint=checkpoint, module=module, head=h if per_head else "all",
                             theta_pos=theta_pos[h].item(), theta_neg=theta_neg[h].item(),
                             lambda_pos=lam_pos[h].item(), lambda_neg=lam_neg[h].item(),
                             row_sum=1 + lam_pos[h].item() - lam_neg[h].item()))
    return rows


def trained_lambdas(paths: Sequence[str]) -> List[dict]:
    """The trained lambdas of every checkpoint ``paths`` name (see :func:`checkpoints_in`); the
    checkpoints without trainable lambdas (other types, fixed lambdas) are skipped with a note."""
    from gpam_fairseq.checkpointing.checkpoints import CheckpointError

    rows = []
    for path in paths:
        found = []
        for ckpt in checkpoints_in(path):
            got = read_trained_lambdas(ckpt)
            print(f"| trained lambda: {ckpt}: " + (f"{len(got)} value(s)" if got else
                  "no trainable lambdas (another attention type, or fixed lambdas): skipped"), flush=True)
            found += got
        if not found:
            raise CheckpointError(f"{path}: no checkpoint there holds trainable daGPAM lambdas "
                                  "(lambda_pos_theta / lambda_neg_theta; trained with --gpam-trainable-lambda)", path)
        rows += found
    return rows


def summarise_trained(rows: List[dict]) -> List[str]:
    lines = []
    for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = [r for r in rows if r["checkpoint"] == ckpt]
        pos, neg = [r["lambda_pos"] for r in mine], [r["lambda_neg"] for r in mine]
        lines.append(f"| {ckpt}: {len(mine)} value(s) over {len({r['module'] for r in mine})} module(s): "
                     f"lambda+ {min(pos):.4f}..{max(pos):.4f} (mean {sum(pos) / len(pos):.4f}), "
                     f"lambda- {min(neg):.4f}..{max(neg):.4f} (mean {sum(neg) / len(neg):.4f})")
    return lines
