#!/usr/bin/env python
"""One comparison table of recipe runs, with significance against the baseline.

    python scripts/compare_runs.py --baseline runs/iwslt14/baseline_base_de-en_postln_seed1 \\
        runs/iwslt14/gpam_base_de-en_postln_seed1 runs/iwslt14/gpam_base_de-en_postln_seed2 \\
        [--csv comparison.csv] [--plot valid_curves.png]

Reads the run folders the recipes' evaluate stage writes (run.json, hyps.txt, refs.txt,
tensorboard/). Prints Markdown to stdout: one row per system (the runs that differ only in
their seed are grouped, numbers as mean ± std over seeds), then, for translation runs, each
run against the baseline run of the same seed (else the first baseline run): BLEU delta,
sacreBLEU's paired bootstrap resampling p-value and paired approximate randomization p-value
(both with the run's own BLEU settings, e.g. lowercased for IWSLT14). Writes the same tables
as CSV (--csv, and *_significance.csv beside it) and, with --plot, a PNG of the validation
loss curves read from the tensorboard logs.
"""

import argparse
import csv
import json
import os
import re
import statistics
import sys

METRICS = [  # (run.json key, column title, format)
    ("bleu", "BLEU", "{:.2f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("bleu_tokenized", "tok. BLEU (fairseq-generate)", "{:.2f}"),
    ("bleu_compound_split", "compound-split BLEU", "{:.2f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("bpc", "bits/char", "{:.4f}"),
    ("params", "parameters", "{:,.0f}"),
    ("train_wps", "train words/s", "{:,.0f}"),
]


class CompareError(RuntimeError):
    pass


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def load_run(run_dir):
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise CompareError(f"{run_dir}: no run.json; run the recipe's evaluate stage for it first")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    run["dir"] = run_dir
    run.setdefault("system", os.path.basename(os.path.normpath(run_dir)))
    run.setdefault("group", re.sub(r"_seed\d+$", "", run["system"]))
    files = run.get("files") or {}
    if "hyps" in files:
        run["hyps"] = read_lines(os.path.join(run_dir, files["hyps"]))
        run["refs"] = read_lines(os.path.join(run_dir, files["refs"]))
        if len(run["hyps"]) != len(run["refs"]):
            raise CompareError(f"{run_dir}: {len(run['hyps'])} hypotheses for {len(run['refs'])} references")
    return run


def mean_std(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def bleu_metric(run):
    from sacrebleu.metrics import BLEU

    return BLEU(lowercase=bool(run.get("bleu_lowercase")))


def significance(base, run, bootstrap, ar_trials):
    """(baseline BLEU, system BLEU, p paired bootstrap, p approximate randomization)."""
    from sacrebleu.significance import PairedTest

    if run["refs"] != base["refs"]:
        raise CompareError(f"{run['dir']} and {base['dir']} have different references: compare runs of one test set")
    out = []
    for test_type, n in (("bs", bootstrap), ("ar", ar_trials)):
        test = PairedTest([("baseline", base["hyps"]), ("system", run["hyps"])], {"BLEU": bleu_metric(base)},
                          references=[base["refs"]], test_type=test_type, n_samples=n)
        _, scores = test()
        out.append(scores["BLEU"])
    (b_base, b_sys), (_, ar_sys) = out[0], out[1]
    return b_base.score, b_sys.score, b_sys.p_value, ar_sys.p_value


def system_rows(runs, baseline_groups):
    groups = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    order = sorted(groups, key=lambda g: (g not in baseline_groups, list(groups).index(g)))
    present = [m for m in METRICS if any(r.get(m[0]) is not None for r in runs)]
    header = ["system", "attention", "seeds", *[title for _, title, _ in present]]
    rows = []
    for g in order:
        members = groups[g]
        label = g + (" (baseline)" if g in baseline_groups else "")
        rows.append([label, ", ".join(sorted({str(r.get("attention_type", "?")) for r in members})),
                     ", ".join(str(r.get("seed", "?")) for r in members),
                     *[mean_std([r.get(key) for r in members], fmt) for key, _, fmt in present]])
    return header, rows


def significance_rows(runs, baselines, bootstrap, ar_trials):
    header = ["run", "baseline run", "BLEU baseline", "BLEU run", "delta", "p (paired bootstrap)",
              "p (approx. randomization)"]
    rows = []
    for run in runs:
        if run in baselines or "hyps" not in run:
            continue
        same_seed = [b for b in baselines if b.get("seed") == run.get("seed") and "hyps" in b]
        base = (same_seed or [b for b in baselines if "hyps" in b] or [None])[0]
        if base is None:
            continue
        b, s, p_bs, p_ar = significance(base, run, bootstrap, ar_trials)
        if run["hyps"] == base["hyps"]:  # nothing to test; sacreBLEU would report p = 1/(n+1)
            p_bs = p_ar = "n/a (identical outputs)"
        else:
            p_bs, p_ar = f"{p_bs:.4f}", f"{p_ar:.4f}"
        rows.append([run["system"], base["system"], f"{b:.2f}", f"{s:.2f}", f"{s - b:+.2f}", p_bs, p_ar])
    return header, rows


def markdown(header, rows):
    align = ["---" if i == 0 or not rows or not re.match(r"^[-+\d.,± ]+$", str(rows[0][i])) else "---:"
             for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def validation_curves(run):
    """(updates, validation losses) from the run's tensorboard logs, or None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = os.path.join(run["dir"], (run.get("files") or {}).get("tensorboard", "tensorboard"), "valid")
    if not os.path.isdir(tb):
        return None
    acc = EventAccumulator(tb)
    acc.Reload()
    if "loss" not in acc.Tags().get("scalars", []):
        return None
    events = acc.Scalars("loss")
    return [e.step for e in events], [e.value for e in events]


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    drawn = 0
    for run in runs:
        curve = validation_curves(run)
        if not curve:
            print(f"  no tensorboard validation loss in {run['dir']}: left out of the plot", file=sys.stderr)
            continue
        color = colors.setdefault(run["group"], f"C{len(colors)}")
        ax.plot(*curve, marker=".", color=color, label=f"{run['group']} (seed {run.get('seed', '?')})")
        drawn += 1
    ax.set_xlabel("updates")
    ax.set_ylabel("validation loss (base 2)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--baseline", action="append", required=True, metavar="RUN_DIR",
                        help="a baseline run folder (repeat for several seeds)")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="the other run folders")
    parser.add_argument("--csv", default="comparison.csv", help="CSV of the system table (default: %(default)s)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the validation loss curves into this PNG")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default: %(default)s)")
    parser.add_argument("--ar-trials", type=int, default=10000, help="approximate randomization trials (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        baselines = [load_run(d) for d in args.baseline]
        others = [load_run(d) for d in args.runs if d not in args.baseline]
        runs = baselines + others
        header, rows = system_rows(runs, {b["group"] for b in baselines})
        sig_header, sig_rows = significance_rows(runs, baselines, args.bootstrap, args.ar_trials)
    except CompareError as e:
        sys.exit(f"compare_runs: {e}")
    print(markdown(header, rows))
    bleu = [r for r in runs if r.get("bleu_signature")]
    if bleu:
        print(f"\nBLEU: sacreBLEU, signature `{bleu[0]['bleu_signature']}`; chrF `{bleu[0].get('chrf_signature', '')}`.")
    if sig_rows:
        print(f"\nEach run against the baseline ({args.bootstrap} paired bootstrap resamples, "
              f"{args.ar_trials} approximate randomization trials; sacreBLEU):\n")
        print(markdown(sig_header, sig_rows))
        print("\nBoth tests count the resamples whose BLEU difference is strictly larger than the observed "
              "one (sacreBLEU, after multeval), so a zero delta gets p = 1/(n+1): read p only next to a non-zero delta.")
    write_csv(args.csv, header, rows)
    print(f"\nCSV: {args.csv}")
    if sig_rows:
        sig_csv = os.path.splitext(args.csv)[0] + "_significance.csv"
        write_csv(sig_csv, sig_header, sig_rows)
        print(f"CSV: {sig_csv}")
    if args.plot:
        n = plot(runs, args.plot)
        print(f"PNG: {args.plot} ({n} validation curves)")
    return header, rows, sig_header, sig_rows


if __name__ == "__main__":
    main()
