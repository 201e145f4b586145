"""Kernels, saved bytes, speed and memory of every attention we ship, next to stock fairseq.

The command line of ``scripts/benchmark.py``. Five levels (``--levels``, any subset, run in this
order), each a function of its inputs:

* ``ops`` (deterministic, any device, seconds on a CPU): the kernels one forward + backward
  pass launches and the bytes autograd keeps for the backward pass, per attention role and per
  whole training step (:mod:`.ops`). Written to ``ops.csv``.
* ``core``, ``attention``, ``train``, ``beam``: the median time and peak memory of the
  attention core, one attention module, one training step and beam search (:mod:`.timed`).
  Written to ``benchmark.csv``.

Every row has stock fairseq (or, at the core level, one SDPA call) and each ``--attention-type``,
with the ratio to the stock row.

    python scripts/benchmark.py --levels ops                      # the deterministic table (CPU)
    python scripts/benchmark.py --device cuda --levels core,attention,train,beam --dtypes bf16
    python scripts/benchmark.py --quick                           # tiny CPU smoke run (the tests)

Writes ``ops.csv`` / ``benchmark.csv``, ``benchmark.md`` and ``benchmark.png`` into ``--out-dir``
(:mod:`.report`).
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import List

import torch

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT
from gpam_fairseq.measurement.benchmark.inputs import DTYPES, FULL_SHAPES, LEVELS, QUICK_SHAPES, mechanism_names
from gpam_fairseq.measurement.benchmark.ops import OPS_PAIRS, ops_level
from gpam_fairseq.measurement.benchmark.report import (
    FIELDS, OPS_FIELDS, environment, log, ops_table, timing_table, write_csv, write_plot)
from gpam_fairseq.measurement.benchmark.timed import timed_level
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 for the timed levels "
                   "(default: all three on cuda, fp32 on cpu); the ops level counts in fp32")
    p.add_argument("--levels", default=",".join(LEVELS), help=f"comma list of {','.join(LEVELS)}")
    p.add_argument("--shapes", default=None, help="comma list of iwslt,wmt_big,lm512,lm3072 (default: all; "
                   "the ops level's training steps use iwslt, wmt_big and lm512)")
    p.add_argument("--types", default=None, help="comma list of attention types (default: every registered one)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10, beam level 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; --quick 1)")
    p.add_argument("--batch-scale", type=float, default=1.0,
                   help="multiply every timed batch size (and the beam level's sentences) by this, e.g. 0.125 on a CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke run of every row in seconds "
                   "(the ops level's modules keep their size; its training steps use the tiny models)")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "runs", "benchmark"), help="where the CSV, Markdown and PNG go")
    return p.parse_args(argv)


@refusals_exit_2
def main(argv=None) -> List[dict]:
    threads_before = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads_before)  # main() also runs inside the tests' process


def run(argv=None) -> List[dict]:
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device_name = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda, but torch sees no CUDA device (torch "
                 f"{torch.__version__}); run on a GPU machine or pass --device cpu")
    device = torch.device(device_name)
    dtype_names = (args.dtypes or ("fp32,fp16,bf16" if device.type == "cuda" else "fp32")).split(",")
    for d in dtype_names:
        if d not in DTYPES:
            sys.exit(f"benchmark: --dtypes: unknown {d!r}; choose from {', '.join(DTYPES)}")
    levels = args.levels.split(",")
    for lv in levels:
        if lv not in LEVELS:
            sys.exit(f"benchmark: --levels: unknown {lv!r}; choose from {', '.join(LEVELS)}")
    types = mechanism_names()
    if args.types:
        unknown = set(args.types.split(",")) - set(types)
        if unknown:
            sys.exit(f"benchmark: --types: unknown {sorted(unknown)}; choose from {', '.join(types)}")
        types = [t for t in types if t in args.types.split(",")]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    wanted = args.shapes.split(",") if args.shapes else [s.name for s in shapes]
    unknown = set(wanted) - {s.name for s in shapes}
    if unknown:
        sys.exit(f"benchmark: --shapes: unknown {sorted(unknown)}; choose from {', '.join(s.name for s in shapes)}")
    timed_shapes = tuple(s for s in shapes if s.name in wanted)
    ops_pairs = tuple(s for s in shapes if s.name in OPS_PAIRS and s.name in wanted)
    if not args.batch_scale > 0:
        sys.exit(f"benchmark: --batch-scale: must be > 0, got {args.batch_scale}")
    if args.batch_scale != 1.0:
        scaled = lambda n: max(1, round(n * args.batch_scale)) if n else 0
        timed_shapes = tuple(dataclasses.replace(s, batch=scaled(s.batch), beam_sentences=scaled(s.beam_sentences))
                             for s in timed_shapes)
    repeats = args.repeats or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    os.makedirs(args.out_dir, exist_ok=True)
    log(f"{environment()}; device {device}, dtypes {dtype_names}, levels {levels}, types {types}, "
        f"{repeats} timed calls per row, {warmup} warm-up")

    start = time.time()
    ops_rows: List[dict] = []
    timed_rows: List[dict] = []
    csv_path = os.path.join(args.out_dir, "benchmark.csv")
    ops_path = os.path.join(args.out_dir, "ops.csv")
    if "ops" in levels:
        log(f"ops: kernels and saved bytes, module per role and whole training steps ({', '.join(s.name for s in ops_pairs)})")
        ops_rows = ops_level(ops_pairs, device, types)
        write_csv(ops_rows, ops_path, OPS_FIELDS)
        print(ops_table(ops_rows), flush=True)
    for level in LEVELS[1:]:
        if level not in levels:
            continue
        # a beam-search call lasts seconds: fewer of them unless --repeats was given
        reps, warm = (min(repeats, 3), min(warmup, 1)) if level == "beam" and args.repeats is None else (repeats, warmup)
        done = list(timed_rows)
        timed_rows = done + timed_level(level, timed_shapes, dtype_names, device, types, warm, reps,
                                        # partial results survive a time limit
                                        lambda rows: write_csv(done + rows, csv_path, FIELDS))
    if timed_rows:
        write_csv(timed_rows, csv_path, FIELDS)
    md_path = os.path.join(args.out_dir, "benchmark.md")
    png_path = os.path.join(args.out_dir, "benchmark.png")
    with open(md_path, "w") as f:
        f.write(f"Command: `python scripts/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                f"{environment()}\n\n")
        if ops_rows:
            f.write("Kernels launched by one forward + backward pass (a fused attention call counts one each "
                    "way) and bytes kept for the backward pass; deterministic.\n\n" + ops_table(ops_rows) + "\n")
        if timed_rows:
            f.write(timing_table(timed_rows))
    write_plot(ops_rows, timed_rows, png_path)
    log(f"done in {time.time() - start:.0f} s: {md_path}, {png_path}"
        + (f", {ops_path}" if ops_rows else "") + (f", {csv_path}" if timed_rows else ""))
    return ops_rows + timed_rows
