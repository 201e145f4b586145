"""The memory ledger: what one training step keeps for the backward pass, by role, stock beside daGPAM.

For each pair (``iwslt``, ``wmt_big``, ``lm512``: the real architectures and dictionaries) and
each ``--dropouts`` value (fairseq's ``--dropout``), one training step (forward, cross-entropy,
backward) of stock fairseq, of daGPAM and of daGPAM with ``--gpam-recompute-attention`` is run
under :class:`gpam_fairseq.measurement.profiling.CostCounter` with a
:class:`~gpam_fairseq.measurement.profiling.SavedTensorLedger`: every tensor autograd saves is
recorded through ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, with
its role, its origin (the kernel that wrote it, and in which module) and whether it copies
another saved tensor. The fused attention call is accounted as a GPU kernel keeps its tensors
(its inputs, output, a float32 log-sum-exp per query row and its mask): on a CPU, SDPA's math
fallback under attention dropout keeps more. Kernels are counted in the same pass.

    python scripts/benchmark_memory.py --out-dir DIR                 # all pairs, dropout 0 and 0.3
    python scripts/benchmark_memory.py --pairs iwslt --dropouts 0.3 --quick

Writes ``ledger.md`` (per pair and dropout: MiB by role in each variant, the total, kernels,
and the first layer's attention tensor by tensor), ``ledger.csv`` (every saved tensor of every
run) and ``totals.csv`` (one row a run) into ``--out-dir``. Batches: 16 sentences × 32 tokens
(NMT), 1 × 512 tokens (LM); ``--quick``: the benchmark's tiny models.
"""

import argparse
import csv
import os
import sys
import time
from typing import Dict, List, Sequence

import torch

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT
from gpam_fairseq.measurement.benchmark import inputs, report
from gpam_fairseq.measurement.profiling import ROLES, SavedTensorLedger, count_pass
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2

BATCHES = {"iwslt": (16, 32), "wmt_big": (16, 32), "lm512": (1, 512)}
VARIANTS = ("stock", "dagpam", inputs.RECOMPUTED)
TOTAL_FIELDS = ("pair", "dropout", "variant", "batch", "length", "saved_bytes", "counter_saved_bytes",
                "saved_ratio", "kernels", "kernel_ratio") + tuple(f"role:{r}" for r in ROLES)
TENSOR_FIELDS = ("pair", "dropout", "variant", "role", "bytes", "duplicated", "saves", "shape", "dtype", "origin",
                 "module", "saver")
MIB = 2**20


def log(msg: str) -> None:
    print(f"[ledger {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(shape: inputs.Shape, variant: str, dropout: float, batch: int, length: int, device) -> dict:
    """One counted training step with its ledger."""
    from gpam_fairseq.attention.multihead import clear_mask_cache

    arch = shape.stock_arch if variant == "stock" else shape.gpam_arch
    extra = (() if variant == "stock" else inputs.variant_flags(variant)) + ("--dropout", str(dropout))
    model, dictionary = inputs.build_model(shape, arch, extra)
    model = model.to(device).train()
    loss, _ = inputs.training_loss(model, shape, batch, length, dictionary, device, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    loss().backward()  # one pass first: constants made once per process are not a cost of the pass
    for p in params:
        p.grad = None
    clear_mask_cache()
    ledger = SavedTensorLedger(model)
    counter = count_pass(loss, exclude=params, ledger=ledger)
    return dict(pair=shape.name, dropout=dropout, variant=variant, batch=batch, length=length,
                saved_bytes=ledger.total_bytes, counter_saved_bytes=counter.saved_bytes, kernels=counter.kernels,
                by_role=ledger.by_role(), tensors=ledger.rows())


def with_ratios(group: List[dict]) -> List[dict]:
    stock = group[0]
    for r in group:
        r["saved_ratio"] = r["saved_bytes"] / stock["saved_bytes"]
        r["kernel_ratio"] = r["kernels"] / stock["kernels"]
    return group


def mib(n: float) -> str:
    return f"{n / MIB:,.2f}"


def role_table(group: List[dict]) -> str:
    """MiB by role, one column per variant, differences to stock, totals and kernels."""
    names = [r["variant"] for r in group]
    lines = ["| role | " + " | ".join(f"`{n}` MiB" for n in names) + " | " +
             " | ".join(f"`{n}` − stock" for n in names[1:]) + " |",
             "| --- |" + " ---: |" * (2 * len(names) - 1)]
    roles = [role for role in ROLES if any(r["by_role"].get(role, {}).get("bytes") for r in group)]
    for role in roles:
        cells = [r["by_role"].get(role, {}) for r in group]
        shown = []
        for c in cells:
            text = mib(c.get("bytes", 0))
            if c.get("duplicated"):
                text += f" (copies of saved: {mib(c['duplicated'])})"
            shown.append(text)
        diffs = [f"{(c.get('bytes', 0) - cells[0].get('bytes', 0)) / MIB:+,.2f}" for c in cells[1:]]
        lines.append(f"| {role} | " + " | ".join(shown) + " | " + " | ".join(diffs) + " |")
    lines.append("| **total** | " + " | ".join(f"**{mib(r['saved_bytes'])}** ({r['saved_ratio']:.3f} ×)" for r in group)
                 + " | " + " | ".join(f"{(r['saved_bytes'] - group[0]['saved_bytes']) / MIB:+,.2f}" for r in group[1:])
                 + " |")
    lines.append("| kernels, forward + backward | " + " | ".join(f"{r['kernels']} ({r['kernel_ratio']:.3f} ×)"
                                                             for r in group) + " |" + " |" * (len(group) - 1))
    return "\n".join(lines) + "\n"


def first_layer_tensors(run: dict) -> List[dict]:
    """The saved tensors made or saved by the first encoder and decoder layer's attention."""
    wanted = ("encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.encoder_attn")
    return [t for t in run["tensors"]
            if any(t["module"].startswith(w) or t["saver"].startswith(w) for w in wanted)]


def tensor_table(group: List[dict]) -> str:
    lines = ["| variant | role | MiB | saved by n nodes | shape | dtype | made by | in | saved in |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- |"]
    for run in group:
        for t in first_layer_tensors(run):
            dup = f" (copy of saved: {mib(t['duplicated'])})" if t["duplicated"] else ""
            lines.append(f"| {run['variant']} | {t['role']} | {mib(t['bytes'])}{dup} | {t['saves']} | {t['shape']} | "
                         f"{t['dtype']} | `{t['origin']}` | {t['module'] or '—'} | {t['saver'] or '—'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="iwslt,wmt_big,lm512", help="comma list of " + ",".join(BATCHES))
    p.add_argument("--dropouts", default="0,0.3", help="comma list of fairseq --dropout values (default 0,0.3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS)
                   + " (stock is always measured first: the ratios are to it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="the benchmark's tiny models (a smoke run for the tests)")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "runs", "memory_ledger"))
    args = p.parse_args(argv)
    pairs = args.pairs.split(",")
    unknown = [x for x in pairs if x not in BATCHES]
    if unknown:
        p.error(f"--pairs: unknown {unknown}; choose from {', '.join(BATCHES)}")
    try:
        args.dropout_values = [float(x) for x in args.dropouts.split(",")]
    except ValueError:
        p.error(f"--dropouts: a comma list of numbers in [0, 1), got {args.dropouts!r}")
    if not all(0.0 <= x < 1.0 for x in args.dropout_values):
        p.error(f"--dropouts: values must lie in [0, 1), got {args.dropouts!r}")
    variants = args.variants.split(",")
    unknown = [x for x in variants if x not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    args.variant_names = ["stock"] + [v for v in VARIANTS[1:] if v in variants]
    args.pair_names = pairs
    return args


@refusals_exit_2
def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def run(args, argv) -> List[dict]:
    device = torch.device("cpu")
    shapes = {s.name: s for s in (inputs.QUICK_SHAPES if args.quick else inputs.FULL_SHAPES)}
    os.makedirs(args.out_dir, exist_ok=True)
    command = "python scripts/benchmark_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections, runs = [], []
    for name in args.pair_names:
        shape = shapes[name]
        batch, length = (shape.batch, shape.length) if args.quick else BATCHES[name]
        for dropout in args.dropout_values:
            group = []
            for variant in args.variant_names:
                log(f"{name}, dropout {dropout:g}, {variant}: one training step of {batch} × {length} tokens")
                group.append(measure(shape, variant, dropout, batch, length, device))
            with_ratios(group)
            for r in group:
                log(f"  {r['variant']:>16}: {mib(r['saved_bytes'])} MiB ({r['saved_ratio']:.3f} × stock), "
                    f"{r['kernels']} kernels ({r['kernel_ratio']:.3f} ×)")
            runs += group
            sections.append(f"### {name}, dropout {dropout:g} ({batch} × {length} tokens)\n\n" + role_table(group)
                            + "\nFirst layer's attention modules, tensor by tensor (made or saved there):\n\n"
                            + tensor_table(group))
    header = (f"Command: `{command}`\n\n{report.environment()}\n\n"
              "Bytes autograd keeps from one training step's forward pass for its backward pass (parameters "
              "excluded), counted once per storage through saved-tensor hooks, by role; the fused attention call "
              "as a GPU kernel keeps its tensors. `copies of saved`: bytes of a saved tensor made by copying "
              "another saved tensor. Ratios are to stock fairseq in the same run.\n\n")
    with open(os.path.join(args.out_dir, "ledger.md"), "w") as f:
        f.write(header + "\n".join(sections))
    with open(os.path.join(args.out_dir, "totals.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TOTAL_FIELDS)
        w.writeheader()
        for r in runs:
            row = {k: r[k] for k in TOTAL_FIELDS if not k.startswith("role:")}
            row.update({f"role:{role}": r["by_role"].get(role, {}).get("bytes", 0) for role in ROLES})
            w.writerow(row)
    with open(os.path.join(args.out_dir, "ledger.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TENSOR_FIELDS)
        w.writeheader()
        for r in runs:
            for t in r["tensors"]:
                w.writerow(dict(pair=r["pair"], dropout=r["dropout"], variant=r["variant"], **t))
    log(f"wrote {args.out_dir}/ledger.md, totals.csv, ledger.csv")
    return runs


if __name__ == "__main__":
    main()
