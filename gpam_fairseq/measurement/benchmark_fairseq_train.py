"""Words/s of real ``fairseq-train`` runs, each stock architecture against its daGPAM twin.

The training-speed target (docs/performance.md) is the throughput that ``fairseq-train`` logs, at identical
settings, so this script runs exactly that: it writes a synthetic corpus (random tokens,
Zipf-distributed, the recipes' vocabulary sizes), binarises it once with ``fairseq-preprocess``
and then, for each pair, runs ``fairseq-train`` with the stock ``--arch`` and with ours, in
``--rounds`` interleaved rounds (stock, ours, stock, ours, ...), the same flags, seed and data.

Steady state only: the ``train_inner`` records of the first ``--discard-updates`` updates of
every run (start-up, kernel autotuning, allocator warm-up) are dropped by their update count,
and a run's figure is the median ``wps`` of the records left. A pair's figure is the median
of its rounds' figures with their min–max, and its ratio (ours / stock, the median of the
per-round ratios) is printed with the min–max of those ratios: one round gives no spread,
and its ratio is marked as such.

Peak memory: every ``fairseq-train`` runs in a child process of this script that calls
fairseq's own entry point (``fairseq_cli.train.cli_main``) and prints, as its last line, the
peak CUDA memory allocated over the whole run (``torch.cuda.max_memory_allocated``; fairseq
resets that counter after every update to log ``gb_free``, rounded to 0.1 GB, so the wrapper
reads the counter before each reset and keeps the maximum) and the peak resident memory of
the process (``ru_maxrss``). The table quotes the CUDA figure on a GPU and the resident
memory on a CPU, and says which. On a CPU the resident memory is the model, its gradients and
optimizer state, the activations kept for the backward pass and the runtime (Python, torch,
fairseq, the data); the runtime is the same in both architectures, so a difference between
them is the model's: parameters and, above all, activations.

    python scripts/benchmark_fairseq_train.py --pairs iwslt,lm512 --rounds 3                 # a GPU, fp16
    python scripts/benchmark_fairseq_train.py --pairs iwslt,lm512 --rounds 3 --precision bf16
    python scripts/benchmark_fairseq_train.py --quick                                        # CPU smoke run

Pairs: ``iwslt`` (transformer_iwslt_de_en / transformer_gpam_iwslt_de_en, --max-tokens 4096),
``wmt_big`` (transformer_vaswani_wmt_en_de_big / transformer_gpam_vaswani_wmt_en_de_big,
--max-tokens 3584), ``lm512`` (transformer_lm / transformer_lm_gpam, --tokens-per-sample 512,
--max-tokens 4096). Writes ``fairseq_train.csv`` (one row a run), ``fairseq_train.md`` (the
per-pair summary first) into ``--out-dir`` after every round (a run stopped by a time limit
keeps the rounds done) and keeps every run's log there.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import time

import numpy as np

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT, USER_DIR, log_records, run_logged
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2

NMT_FLAGS = ["--share-decoder-input-output-embed", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
             "--clip-norm", "0.0", "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
             "--dropout", "0.3", "--weight-decay", "0.0001", "--criterion", "label_smoothed_cross_entropy",
             "--label-smoothing", "0.1"]
LM_FLAGS = ["--task", "language_modeling", "--share-decoder-input-output-embed", "--dropout", "0.1",
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--clip-norm", "0.0",
            "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
            "--sample-break-mode", "none", "--criterion", "cross_entropy"]
# name: (stock arch, our arch, task flags, batch flags, vocabulary size)
PAIRS = {
    "iwslt": ("transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en", NMT_FLAGS, ["--max-tokens", "4096"], 8848),
    "wmt_big": ("transformer_vaswani_wmt_en_de_big", "transformer_gpam_vaswani_wmt_en_de_big", NMT_FLAGS,
                ["--max-tokens", "3584"], 32768),
    "lm512": ("transformer_lm", "transformer_lm_gpam", LM_FLAGS,
              ["--tokens-per-sample", "512", "--max-tokens", "4096"], 32768),
}
TINY_NMT = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim",
            "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads",
            "2", "--decoder-attention-heads", "2"]
TINY_LM = ["--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
           "--decoder-attention-heads", "2"]
FIELDS = ("pair", "precision", "round", "arch", "updates", "records", "median_wps", "min_wps", "max_wps",
          "ratio_to_stock", "peak_mib", "peak_kind", "mem_ratio_to_stock", "cuda_peak_mib", "max_rss_mib", "wall_s")
PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "memory-efficient-fp16": ["--memory-efficient-fp16"],
                   "bf16": ["--bf16"]}
# the line the fairseq-train wrapper (fairseq_train_with_peak_memory) prints last
PEAK_MARKER = "peak_memory | "


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def write_corpus(folder, sentences, vocab, seed):
    """Random sentences over a Zipf-like vocabulary, 8-40 tokens, train/valid of both languages."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    probs = 1.0 / np.arange(1, vocab + 1)
    probs /= probs.sum()
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", sentences), ("valid", max(10, sentences // 100))):
        for lang in ("src", "tgt"):
            lengths = rng.integers(8, 41, size=n)
            tokens = rng.choice(vocab, size=int(lengths.sum()), p=probs)
            with open(os.path.join(folder, f"{split}.{lang}"), "w") as f:
                start = 0
                for length in lengths:
                    f.write(" ".join(words[tokens[start:start + length]]) + "\n")
                    start += length


def run_or_fail(cmd, log_path):
    """Run a command into its log; (output, seconds), or exit naming the log."""
    start = time.time()
    code, text = run_logged(cmd, log_path)
    if code != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed (exit {code}); log {log_path}:\n{tail}")
    return text, time.time() - start


def preprocess(work, vocab, sentences, workers):
    """One binarised folder per task: translation src->tgt, and LM on the target side."""
    raw, nmt_bin, lm_bin = (os.path.join(work, d) for d in ("raw", "nmt-bin", "lm-bin"))
    if not os.path.exists(os.path.join(raw, "valid.tgt")):
        log(f"writing a synthetic corpus: {sentences} sentence pairs, vocabulary {vocab}")
        write_corpus(raw, sentences, vocab, seed=1)
    base = [sys.executable, "-m", "fairseq_cli.preprocess", "--workers", str(workers)]
    if not os.path.exists(os.path.join(nmt_bin, "dict.tgt.txt")):
        run_or_fail(base + ["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
                           "--trainpref", f"{raw}/train", "--validpref", f"{raw}/valid", "--destdir", nmt_bin],
                   os.path.join(work, "preprocess-nmt.log"))
    if not os.path.exists(os.path.join(lm_bin, "dict.txt")):
        run_or_fail(base + ["--only-source", "--trainpref", f"{raw}/train.tgt", "--validpref", f"{raw}/valid.tgt",
                           "--destdir", lm_bin], os.path.join(work, "preprocess-lm.log"))
    return nmt_bin, lm_bin


def steady_wps(text, discard_updates):
    """(median, min, max of the logged wps, number of records, last update) over the
    train_inner records logged after update ``discard_updates``."""
    records = log_records(text.splitlines(), "train_inner")
    if not records:
        raise SystemExit("error: fairseq-train logged no train_inner record; raise --updates or lower --log-interval")
    kept = [float(r["wps"]) for r in records if int(r["num_updates"]) > discard_updates]
    if not kept:
        raise SystemExit(f"error: no train_inner record after update {discard_updates} (the last is "
                         f"{records[-1]['num_updates']}); lower --discard-updates or raise --updates")
    return statistics.median(kept), min(kept), max(kept), len(kept), int(records[-1]["num_updates"])


def peak_memory(text):
    """The wrapper's last line: {"cuda_peak_mib": float or None, "max_rss_mib": float}."""
    lines = [line for line in text.splitlines() if line.startswith(PEAK_MARKER)]
    if not lines:
        raise SystemExit("error: the fairseq-train wrapper printed no peak memory line; see the run's log")
    return json.loads(lines[-1][len(PEAK_MARKER):])


def keep_peak_across_resets(cuda):
    """Make cuda.reset_peak_memory_stats() keep the peak it erases; returns a function giving the
    peak allocated since this call. fairseq's trainer resets CUDA's peak counter after every
    update (to log gb_free per update), which would leave only the last update's peak."""
    kept = [cuda.max_memory_allocated()]
    reset = cuda.reset_peak_memory_stats

    def reset_keeping_the_peak(device=None):
        kept[0] = max(kept[0], cuda.max_memory_allocated(device))
        reset(device)

    cuda.reset_peak_memory_stats = reset_keeping_the_peak
    return lambda: max(kept[0], cuda.max_memory_allocated())


def fairseq_train_with_peak_memory(argv):
    """Run fairseq-train (fairseq_cli.train.cli_main) in this process with argv, then print its
    peak memory as the last line (PEAK_MARKER + JSON)."""
    import resource

    import torch

    cuda = torch.cuda.is_available() and "--cpu" not in argv
    run_peak = keep_peak_across_resets(torch.cuda) if cuda else None
    # fairseq_cli.train configures the root logger (fairseq's "date | INFO | name | message" lines on
    # stdout, which steady_wps parses) only if it has no handler yet; importing fairseq above (through
    # gpam_fairseq) already gave it Python's default one
    import logging

    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)
    from fairseq_cli import train

    sys.argv = ["fairseq-train", *argv]
    try:
        train.cli_main()
    finally:
        peak = {"cuda_peak_mib": run_peak() / 2**20 if cuda else None,
                # ru_maxrss: KiB on Linux
                "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(PEAK_MARKER + json.dumps(peak), flush=True)


def summarise(rows):
    """Per pair: the median of the round medians (min–max) of both architectures, the median
    (min–max) of the per-round ratios, and the same for the peak memory."""
    out = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        runs = [r for r in rows if r["pair"] == pair]
        stock = [r for r in runs if r["arch"] == runs[0]["arch"]]
        ours = [r for r in runs if r["arch"] != runs[0]["arch"]]
        summary = dict(pair=pair, rounds=len(ours), stock_arch=stock[0]["arch"], our_arch=ours[0]["arch"],
                       peak_kind=runs[0]["peak_kind"])
        # (median key, its min/max prefix, the runs, the field of each run)
        for median, prefix, rs, field in (("stock_wps", "stock", stock, "median_wps"),
                                          ("our_wps", "our", ours, "median_wps"),
                                          ("ratio", "ratio", ours, "ratio_to_stock"),
                                          ("stock_mem", "stock_mem", stock, "peak_mib"),
                                          ("our_mem", "our_mem", ours, "peak_mib"),
                                          ("mem_ratio", "mem_ratio", ours, "mem_ratio_to_stock")):
            values = [r[field] for r in rs]
            summary[median] = statistics.median(values)
            summary[prefix + "_min"], summary[prefix + "_max"] = min(values), max(values)
        out.append(summary)
    return out


def ratio_text(s, key="ratio"):
    if s["rounds"] < 2:
        return f"{s[key]:.3f} (one round: no spread, not a figure to quote)"
    return f"{s[key]:.3f} (rounds {s[key + '_min']:.3f}–{s[key + '_max']:.3f})"


PEAK_KINDS = {"cuda_max_allocated": "peak CUDA memory allocated (torch.cuda.max_memory_allocated over the whole run)",
              "process_max_rss": "peak resident memory of the fairseq-train process (ru_maxrss): parameters, "
                                 "gradients, optimizer state, the activations kept for the backward pass and the "
                                 "runtime (Python, torch, fairseq, the data), the last the same in both "
                                 "architectures, so that a difference between them is parameters and activations"}


# the command line each run goes through (its --as-fairseq-train calls fairseq_train_with_peak_memory)
SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark_fairseq_train.py")


def train_command(data, arch, task_flags, batch_flags, args, extra):
    cpu = ["--cpu"] if args.device == "cpu" else []
    return ([sys.executable, SCRIPT, "--as-fairseq-train", data, "--user-dir", USER_DIR, "--arch", arch]
            + task_flags + batch_flags + PRECISION_FLAGS[args.precision] + cpu + list(extra)
            + ["--max-update", str(args.updates), "--max-epoch", "1000", "--disable-validation", "--no-save",
               "--log-format", "json", "--log-interval", str(args.log_interval), "--seed", "1",
               "--num-workers", "0", "--required-batch-size-multiple", "8" if args.device == "cuda" else "1"])


def markdown(rows, args):
    lines = [f"`fairseq-train` words/s, {args.device}, {args.precision}, {args.updates} updates a run, the median "
             f"of the train_inner records after update {args.discard_updates}; {args.rounds} interleaved round(s).",
             "", "| pair | rounds | stock arch | stock wps: median (min–max) | daGPAM wps: median (min–max) "
             "| daGPAM / stock: median (min–max of rounds) |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    summaries = summarise(rows)
    for s in summaries:
        lines.append(f"| {s['pair']} | {s['rounds']} | {s['stock_arch']} | {s['stock_wps']:,.0f} "
                     f"({s['stock_min']:,.0f}–{s['stock_max']:,.0f}) | {s['our_wps']:,.0f} "
                     f"({s['our_min']:,.0f}–{s['our_max']:,.0f}) | {ratio_text(s)} |")
    lines += ["", f"Peak memory, MiB: {PEAK_KINDS[rows[0]['peak_kind']]}.", "",
              "| pair | rounds | stock: median (min–max) | daGPAM: median (min–max) | daGPAM / stock: median (min–max of rounds) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        lines.append(f"| {s['pair']} | {s['rounds']} | {s['stock_mem']:,.0f} ({s['stock_mem_min']:,.0f}–"
                     f"{s['stock_mem_max']:,.0f}) | {s['our_mem']:,.0f} ({s['our_mem_min']:,.0f}–{s['our_mem_max']:,.0f}) "
                     f"| {ratio_text(s, 'mem_ratio')} |")
    lines += ["", "Every run (wps: median, min–max of its kept records):", "",
              "| pair | round | arch | records | median wps | min–max | / stock of the round | peak MiB | / stock | wall s |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['round']} | {r['arch']} | {r['records']} | {r['median_wps']:,.0f} | "
                     f"{r['min_wps']:,.0f}–{r['max_wps']:,.0f} | {r['ratio_to_stock']:.3f} | {r['peak_mib']:,.0f} | "
                     f"{r['mem_ratio_to_stock']:.3f} | {r['wall_s']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="iwslt,wmt_big,lm512", help="comma list of " + ",".join(PAIRS))
    p.add_argument("--precision", default=None, choices=list(PRECISION_FLAGS),
                   help="fairseq-train's precision flag, the same for both architectures (default fp16 on cuda, "
                        "fp32 on cpu); bf16 is --bf16 with --user-dir gpam_fairseq (docs/distributed-and-precision.md)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--updates", type=int, default=300, help="--max-update of every run (default 300)")
    p.add_argument("--log-interval", type=int, default=10, help="fairseq's --log-interval: updates per record")
    p.add_argument("--discard-updates", type=int, default=100,
                   help="records of the first N updates of every run are dropped as warm-up (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved stock/daGPAM rounds per pair (default 3)")
    p.add_argument("--sentences", type=int, default=60000, help="synthetic training sentence pairs")
    p.add_argument("--workers", type=int, default=4, help="fairseq-preprocess --workers")
    p.add_argument("--work-dir", default=os.path.join(REPO_ROOT, "runs", "benchmark", "fairseq_train_data"))
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "runs", "benchmark", "fairseq_train"))
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, a smoke run for the tests")
    args = p.parse_args(argv)
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.precision is None:
        args.precision = "fp16" if args.device == "cuda" else "fp32"
    if args.precision == "fp16" and args.device == "cpu":
        p.error("--precision fp16 needs CUDA (fairseq's --fp16); on a CPU use fp32 or memory-efficient-fp16")
    unknown = [name for name in args.pairs.split(",") if name not in PAIRS]
    if unknown:
        p.error(f"--pairs: unknown {unknown}; choose from {', '.join(PAIRS)}")
    if args.rounds < 1:
        p.error(f"--rounds: at least 1, got {args.rounds}")
    if args.quick:
        args.updates, args.log_interval, args.discard_updates, args.sentences = 6, 2, 2, 400
    if args.discard_updates >= args.updates:
        p.error(f"--discard-updates {args.discard_updates} leaves nothing of --updates {args.updates}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    pairs = args.pairs.split(",")
    vocab = max(PAIRS[name][4] for name in pairs) if not args.quick else 200
    nmt_bin, lm_bin = preprocess(args.work_dir, vocab, args.sentences, args.workers)
    rows = []
    for name in pairs:
        stock_arch, our_arch, task_flags, batch_flags, _ = PAIRS[name]
        lm = name.startswith("lm")
        extra = (TINY_LM if lm else TINY_NMT) if args.quick else []
        if args.quick:
            batch_flags = ["--tokens-per-sample", "32", "--max-tokens", "256"] if lm else ["--max-tokens", "256"]
        for round_ in range(1, args.rounds + 1):
            stock_wps = None
            for arch in (stock_arch, our_arch):
                log(f"[{name} round {round_}/{args.rounds}] fairseq-train --arch {arch} ({args.updates} updates, "
                    f"{args.precision})")
                cmd = train_command(lm_bin if lm else nmt_bin, arch, task_flags, batch_flags, args, extra)
                text, wall = run_or_fail(cmd, os.path.join(args.out_dir, f"{name}-{arch}-round{round_}.log"))
                wps, low, high, records, updates = steady_wps(text, args.discard_updates)
                memory = peak_memory(text)
                cuda_peak = memory["cuda_peak_mib"]
                peak, kind = (cuda_peak, "cuda_max_allocated") if cuda_peak is not None else (
                    memory["max_rss_mib"], "process_max_rss")
                if stock_wps is None:
                    stock_wps, stock_peak = wps, peak
                rows.append(dict(pair=name, precision=args.precision, round=round_, arch=arch, updates=updates,
                                 records=records, median_wps=wps, min_wps=low, max_wps=high,
                                 ratio_to_stock=wps / stock_wps, peak_mib=round(peak, 1), peak_kind=kind,
                                 mem_ratio_to_stock=peak / stock_peak,
                                 cuda_peak_mib=None if cuda_peak is None else round(cuda_peak, 1),
                                 max_rss_mib=round(memory["max_rss_mib"], 1), wall_s=round(wall, 1)))
                log(f"    steady wps {wps:,.0f} ({low:,.0f}–{high:,.0f} over {records} records; "
                    f"x stock {wps / stock_wps:.3f}, peak {peak:,.0f} MiB x stock {peak / stock_peak:.3f}, {wall:.0f} s)")
                if arch == our_arch:  # after every round: what is done survives a time limit
                    table = write_results(rows, args)
    print(table)
    return rows


def write_results(rows, args):
    """fairseq_train.csv and fairseq_train.md of the runs so far; returns the Markdown."""
    with open(os.path.join(args.out_dir, "fairseq_train.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args)
    with open(os.path.join(args.out_dir, "fairseq_train.md"), "w") as f:
        f.write(table)
    return table


@refusals_exit_2
def command_line(argv):
    """scripts/benchmark_fairseq_train.py: the benchmark, or one run of train_command()."""
    if argv[:1] == ["--as-fairseq-train"]:  # one run of train_command(): not a user-facing flag
        fairseq_train_with_peak_memory(argv[1:])
    else:
        main(argv)


if __name__ == "__main__":
    command_line(sys.argv[1:])
