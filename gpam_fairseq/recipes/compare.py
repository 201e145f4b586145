"""One comparison table of recipe runs, with significance against the baseline.

    python scripts/compare_runs.py --baseline runs/iwslt14/baseline_base_de-en_postln_seed1 \\
        runs/iwslt14/gpam_base_de-en_postln_seed1 runs/iwslt14/gpam_base_de-en_postln_seed2 \\
        [--csv comparison.csv] [--plot valid_curves.png]

Reads the run folders the recipes' evaluate stage writes (run.json, hyps.txt, refs.txt,
tensorboard/). Prints Markdown to stdout: one row per system (the runs that differ only in
their seed are grouped, numbers as mean ± std over seeds); the inference cost of each system
(decoding speed as fairseq reports it, device, batch settings, peak GPU memory and the
process's peak RSS, each with its ratio to the baseline); then, for translation runs, each
run against the baseline run of the same seed (else the first baseline run): BLEU delta,
sacreBLEU's paired bootstrap resampling p-value and paired approximate randomization p-value
(both with the run's own BLEU settings, e.g. lowercased for IWSLT14); then, for every system
with two or more seeds that the baseline also has, a test over seeds: the per-seed paired
deltas of the main metric (BLEU, bits/char or perplexity; seed s against the baseline's seed
s), their mean, a paired t-test and an exact sign-flip permutation test (both two-sided),
with what that number of seeds can show at all. Writes the tables as CSV (--csv, and
*_inference.csv, *_significance.csv, *_seeds.csv beside it) and, with --plot, a PNG of the
validation loss curves read from the tensorboard logs.
"""

import argparse
import csv
import itertools
import json
import math
import os
import random
import re
import statistics
import sys

from gpam_fairseq.recipes.common import stop

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


# --- inference cost ---------------------------------------------------------------------------

INFERENCE = [  # (run.json "inference" key, column title, scale, format)
    ("sentences_per_s", "sentences/s", 1.0, "{:,.1f}"),
    ("tokens_per_s", "tokens/s", 1.0, "{:,.1f}"),
    ("peak_gpu_memory_bytes", "peak GPU memory (MiB)", 2.0 ** -20, "{:,.0f}"),
    ("peak_rss_bytes", "peak RSS of the process (MiB)", 2.0 ** -20, "{:,.0f}"),
]


def _inference_values(runs, key, scale):
    values = [r["inference"].get(key) for r in runs if r.get("inference")]
    return [v * scale for v in values if v is not None]


def _settings(members):
    inf = [r["inference"] for r in members if r.get("inference")]
    batch = sorted({f"batch {i['batch_size']}" if i.get("batch_size") else f"max tokens {i.get('max_tokens')}" for i in inf})
    beam = sorted({str(i["beam"]) for i in inf if i.get("beam")})
    return (", ".join(sorted({i.get("device", "?") for i in inf})), ", ".join(sorted({i.get("tool", "?") for i in inf})),
            "; ".join(batch) + (f"; beam {', '.join(beam)}" if beam else ""))


def inference_rows(runs, baselines):
    """One row per system: device, tool, batch settings, speed and memory (mean ± std over seeds)
    with the ratio of the means to the baseline's."""
    if not any(r.get("inference") for r in runs):
        return None, []
    groups = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    base_groups = {b["group"] for b in baselines}
    header = ["system", "device", "tool", "settings"]
    for _, title, _, _ in INFERENCE:
        header += [title, "× baseline"]
    rows = []
    for g, members in sorted(groups.items(), key=lambda kv: kv[0] not in base_groups):
        if not any(r.get("inference") for r in members):
            continue
        row = [g + (" (baseline)" if g in base_groups else ""), *_settings(members)]
        for key, _, scale, fmt in INFERENCE:
            values, base = _inference_values(members, key, scale), _inference_values(baselines, key, scale)
            if not values:
                cpu = key == "peak_gpu_memory_bytes" and any(r.get("inference") for r in members)
                row += ["n/a (CPU)" if cpu else "", ""]
                continue
            ratio = f"{statistics.mean(values) / statistics.mean(base):.2f}" if base and statistics.mean(base) else ""
            row += [mean_std(values, fmt), ratio]
        rows.append(row)
    return header, rows


# --- significance over seeds --------------------------------------------------------------------

SEED_METRICS = [("bleu", "BLEU", True), ("bpc", "bits/char", False), ("perplexity", "perplexity", False)]


def main_metric(runs):
    """(run.json key, title, higher is better) of the first metric every run has."""
    for key, title, higher in SEED_METRICS:
        if runs and all(r.get(key) is not None for r in runs):
            return key, title, higher
    return None


def smallest_sign_flip_p(n):
    """The smallest two-sided p an exact sign-flip test over n paired deltas can give: the
    observed signs and their mirror image are the two most extreme of the 2^n."""
    return min(1.0, 2.0 / 2 ** n)


def sign_flip_p(deltas, max_exact=20, samples=200000, seed=0):
    """Two-sided p of the sign-flip permutation test of mean(deltas) = 0: the share of the 2^n
    sign assignments whose |mean| is at least the observed one (exact up to max_exact deltas,
    else Monte Carlo)."""
    n = len(deltas)
    observed = abs(sum(deltas)) - 1e-12 * max(1.0, sum(abs(d) for d in deltas))
    if n <= max_exact:
        hits = sum(1 for signs in itertools.product((1, -1), repeat=n)
                   if abs(sum(s * d for s, d in zip(signs, deltas))) >= observed)
        return hits / 2 ** n
    rng = random.Random(seed)
    hits = sum(1 for _ in range(samples) if abs(sum(d if rng.random() < 0.5 else -d for d in deltas)) >= observed)
    return (hits + 1) / (samples + 1)


def paired_t_p(deltas):
    """Two-sided p of the paired t-test (one-sample t-test of the deltas against 0), or None
    when the deltas do not vary (t is undefined)."""
    if len(deltas) < 2 or statistics.stdev(deltas) == 0:
        return None
    from scipy import stats

    return float(stats.ttest_1samp(deltas, 0.0).pvalue)


def seed_rows(runs, baselines, alpha):
    """One row per system with at least two seeds the baseline also has; and the sentences to print
    (seeds disagreeing in sign, what the number of seeds can show)."""
    metric = main_metric(runs)
    if metric is None:
        return None, [], []
    key, title, higher = metric
    base_by_seed = {}
    for b in baselines:
        base_by_seed.setdefault(b.get("seed"), b)
    groups = {}
    for run in runs:
        if run not in baselines:
            groups.setdefault(run["group"], []).append(run)
    header = ["system", "baseline", "metric", "seeds (n)", "per-seed delta", "mean delta", "p (paired t-test)",
              "p (sign-flip, exact)", "smallest sign-flip p with n seeds", f"significant at {alpha:g}?"]
    rows, notes = [], []
    for g, members in groups.items():
        pairs = [(r, base_by_seed[r.get("seed")]) for r in members if r.get("seed") in base_by_seed]
        if len(pairs) < 2:
            continue
        pairs.sort(key=lambda p: p[0].get("seed"))
        seeds = [r.get("seed") for r, _ in pairs]
        deltas = [r[key] - b[key] for r, b in pairs]
        n = len(deltas)
        p_t = paired_t_p(deltas)
        p_flip = sign_flip_p(deltas)
        floor = smallest_sign_flip_p(n)
        identical = all(d == 0 for d in deltas)
        t_sig = p_t is not None and p_t < alpha
        flip_sig = not identical and p_flip < alpha
        verdict = ("yes, both tests" if t_sig and flip_sig else "t-test only" if t_sig else
                   "sign-flip test only" if flip_sig else "no")
        if identical:
            p_t_text = "n/a (all deltas 0)"
        elif p_t is None:
            p_t_text = "n/a (deltas do not vary)"
        else:
            p_t_text = f"{p_t:.3g}"
        base_group = pairs[0][1]["group"]
        rows.append([g, base_group, f"{title} ({'higher' if higher else 'lower'} is better)",
                     f"{', '.join(str(s) for s in seeds)} ({n})", ", ".join(f"{d:+.2f}" for d in deltas),
                     f"{statistics.mean(deltas):+.3f}", p_t_text, f"{p_flip:.4g}", f"{floor:.4g}", verdict])
        better = [s for s, d in zip(seeds, deltas) if (d > 0) == higher and d != 0]
        worse = [s for s, d in zip(seeds, deltas) if (d < 0) == higher and d != 0]
        if better and worse:
            notes.append(f"The seeds disagree in sign for {g}: better than {base_group} with seed(s) "
                         f"{', '.join(map(str, better))}, worse with seed(s) {', '.join(map(str, worse))} ({title}).")
        if floor >= alpha:
            need = next(k for k in range(n, 64) if smallest_sign_flip_p(k) < alpha)
            notes.append(f"{g}: with {n} paired seeds the exact sign-flip test cannot give p below {floor:.4g} "
                         f"(2/2^{n}), so it cannot call anything significant at {alpha:g}; that takes {need} seeds. "
                         f"The t-test can, but only by assuming the per-seed deltas are normally distributed.")
    return header, rows, notes


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


def run(argv=None):
    """Everything main() prints and writes, returned as a dict of tables (header, rows) and notes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--baseline", action="append", required=True, metavar="RUN_DIR",
                        help="a baseline run folder (repeat for several seeds)")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="the other run folders")
    parser.add_argument("--csv", default="comparison.csv", help="CSV of the system table (default: %(default)s)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the validation loss curves into this PNG")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default: %(default)s)")
    parser.add_argument("--ar-trials", type=int, default=10000, help="approximate randomization trials (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the test over seeds (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        baselines = [load_run(d) for d in args.baseline]
        others = [load_run(d) for d in args.runs if d not in args.baseline]
        runs = baselines + others
        header, rows = system_rows(runs, {b["group"] for b in baselines})
        inf_header, inf_rows = inference_rows(runs, baselines)
        sig_header, sig_rows = significance_rows(runs, baselines, args.bootstrap, args.ar_trials)
        seed_header, seed_table, seed_notes = seed_rows(runs, baselines, args.alpha)
    except CompareError as e:
        stop(f"compare_runs: {e}")
    print(markdown(header, rows))
    bleu = [r for r in runs if r.get("bleu_signature")]
    if bleu:
        print(f"\nBLEU: sacreBLEU, signature `{bleu[0]['bleu_signature']}`; chrF `{bleu[0].get('chrf_signature', '')}`.")
    if inf_rows:
        print("\nInference cost (the evaluate stage's fairseq-generate / fairseq-eval-lm on the test set; speed as "
              "fairseq reports it, mean ± std over seeds; × baseline = ratio of the means; peak GPU memory is "
              "torch.cuda.max_memory_allocated, n/a on a CPU; peak RSS is the process's CPU memory):\n")
        print(markdown(inf_header, inf_rows))
        if len({r["inference"].get("device") for r in runs if r.get("inference")}) > 1:
            print("\nThe runs were measured on different devices: the ratios compare the devices too.")
    if sig_rows:
        print(f"\nEach run against the baseline ({args.bootstrap} paired bootstrap resamples, "
              f"{args.ar_trials} approximate randomization trials; sacreBLEU):\n")
        print(markdown(sig_header, sig_rows))
        print("\nBoth tests count the resamples whose BLEU difference is strictly larger than the observed "
              "one (sacreBLEU, after multeval), so a zero delta gets p = 1/(n+1): read p only next to a non-zero delta. "
              "They test one test set of one seed: whether the difference could come from the choice of sentences, "
              "not whether another seed would give it again.")
    if seed_table:
        print("\nAcross seeds: seed s of each system against seed s of the baseline; both tests two-sided, "
              "over the per-seed deltas of the main metric:\n")
        print(markdown(seed_header, seed_table))
        if seed_notes:
            print("\n" + "\n".join(seed_notes))
    write_csv(args.csv, header, rows)
    print(f"\nCSV: {args.csv}")
    stem = os.path.splitext(args.csv)[0]
    for suffix, (h, r) in (("_inference", (inf_header, inf_rows)), ("_significance", (sig_header, sig_rows)),
                           ("_seeds", (seed_header, seed_table))):
        if r:
            write_csv(stem + suffix + ".csv", h, r)
            print(f"CSV: {stem + suffix}.csv")
    if args.plot:
        n = plot(runs, args.plot)
        print(f"PNG: {args.plot} ({n} validation curves)")
    return {"header": header, "rows": rows, "inference_header": inf_header, "inference_rows": inf_rows,
            "sig_header": sig_header, "sig_rows": sig_rows, "seed_header": seed_header, "seed_rows": seed_table,
            "seed_notes": seed_notes}


def main(argv=None):
    """Print and write the comparison; returns (header, rows, sig_header, sig_rows) (run() has all tables)."""
    out = run(argv)
    return out["header"], out["rows"], out["sig_header"], out["sig_rows"]


if __name__ == "__main__":
    main()
