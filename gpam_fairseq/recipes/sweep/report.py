"""The results of a λ sweep, read from its run folders: one row per setting (mean ± std over the seeds),
the Markdown and CSV tables and the plot."""

import csv
import json
import os
import statistics
from dataclasses import asdict
from typing import Optional


# ----------------------------------------------------------------------------- results


def metric_of(recipe):
    """(run.json key, title, higher is better) of the recipe's main metric."""
    if recipe.task == "translation":
        return "bleu", "BLEU", True
    if recipe.bits_per_char:
        return "bpc", "bits/char", False
    return "perplexity", "perplexity", False


def best_valid_loss(run_dir) -> Optional[float]:
    """The lowest validation loss (base 2) fairseq-train logged for the run, over all its train logs."""
    import glob

    from gpam_fairseq.fairseq_glue.tools import log_records

    losses = []
    for path in glob.glob(os.path.join(run_dir, "train*.log")):
        with open(path, encoding="utf-8") as f:
            losses += [float(r["valid_loss"]) for r in log_records(f, "valid")]
    return min(losses) if losses else None


def collect(cells, recipe):
    """One row per setting: the metric's mean ± std over the seeds whose run folder has a run.json,
    and the best validation loss's (the figure to choose λ by: the metric is the test set's)."""
    key, title, higher = metric_of(recipe)
    rows = []
    for setting in dict.fromkeys(c.setting for c in cells):
        members = [c for c in cells if c.setting == setting]
        values, params, seeds, valid = [], [], [], []
        for c in members:
            path = os.path.join(c.run_dir, "run.json")
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            if result.get(key) is None:
                continue
            values.append(float(result[key]))
            params.append(result.get("params"))
            seeds.append(c.seed)
            loss = best_valid_loss(c.run_dir)
            if loss is not None:
                valid.append(loss)
        rows.append({"setting": setting.tag(), **asdict(setting), "seeds": seeds, "n": len(values),
                     "missing_seeds": [c.seed for c in members if c.seed not in seeds],
                     "mean": statistics.mean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else None,
                     "valid_mean": statistics.mean(valid) if valid else None,
                     "valid_std": statistics.stdev(valid) if len(valid) > 1 else None,
                     "params": params[0] if params and len(set(params)) == 1 else None})
    base = next((r for r in rows if r["model"] == "baseline" and r["mean"] is not None), None)
    for r in rows:
        r["delta"] = r["mean"] - base["mean"] if base and r["mean"] is not None else None
    return rows, (key, title, higher)


def _fmt(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}"


def write_tables(rows, metric, out, header_lines):
    key, title, higher = metric
    md_path, csv_path = os.path.join(out, "results.md"), os.path.join(out, "results.csv")
    lines = [*header_lines, "",
             f"Metric: test {title} ({'higher' if higher else 'lower'} is better), mean ± std over the seeds present; "
             f"Δ: difference of the means to the baseline's; best valid loss: the lowest validation loss (base 2) "
             f"of each run, mean ± std (choose λ by it, not by the test metric); parameters: fairseq's count.", "",
             f"| setting | model | λ+ | λ− | λ | W_Q− init | W_Q− | blocks | seeds | {title} | Δ vs baseline | "
             f"best valid loss | parameters |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gpam = r["model"] == "gpam"
        value = "" if r["mean"] is None else _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] is not None else "")
        seeds = ", ".join(map(str, r["seeds"]))
        if r["missing_seeds"]:
            seeds += f" (missing {', '.join(map(str, r['missing_seeds']))})"
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        valid = "" if r["valid_mean"] is None else _fmt(r["valid_mean"], 3) + (
            f" ± {_fmt(r['valid_std'], 3)}" if r["valid_std"] is not None else "")
        params = "" if r["params"] is None else f"{r['params']:,}"
        if gpam:
            knobs = [_fmt(r["lambda_pos"], 3), _fmt(r["lambda_neg"], 3), "trainable" if r["trainable"] else "fixed",
                     r["neg_query_init"], r["neg_query"], r["blocks"]]
        else:
            knobs = ["—"] * 6
        lines.append("| " + " | ".join([r["setting"], r["model"], *knobs, seeds, value, delta, valid, params]) + " |")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    fields = ["setting", "model", "lambda_pos", "lambda_neg", "trainable", "neg_query_init", "neg_query", "blocks",
              "seeds", "n", "missing_seeds", f"{key}_mean", f"{key}_std", "delta_vs_baseline", "best_valid_loss_mean",
              "best_valid_loss_std", "params"]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow([r["setting"], r["model"], r["lambda_pos"], r["lambda_neg"], r["trainable"] if r["model"] == "gpam" else "",
                        r["neg_query_init"] if r["model"] == "gpam" else "", r["neg_query"] if r["model"] == "gpam" else "",
                        r["blocks"] if r["model"] == "gpam" else "", " ".join(map(str, r["seeds"])), r["n"],
                        " ".join(map(str, r["missing_seeds"])), r["mean"], r["std"], r["delta"], r["valid_mean"],
                        r["valid_std"], r["params"]])
    return md_path, csv_path


def plot(rows, metric, out, x_name, tied, title=""):
    """The metric against λ, one line per combination of the other settings, error bars = std
    over seeds; each baseline as a band of its mean ± std."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging setup would print its font search

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, title, higher = metric
    other = [k for k in ("lambda_neg", "lambda_pos", "trainable", "neg_query_init", "neg_query", "blocks")
             if k != x_name and not (tied and k in ("lambda_pos", "lambda_neg"))]
    lines = {}
    for r in rows:
        if r["model"] == "gpam" and r["mean"] is not None:
            lines.setdefault(tuple(r[k] for k in other), []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = {"lambda_neg": "λ−", "lambda_pos": "λ+", "neg_query_init": "W_Q− init", "neg_query": "W_Q−", "blocks": "blocks"}
    for i, (combo, members) in enumerate(lines.items()):
        members.sort(key=lambda r: r[x_name])
        label = ", ".join(("trainable λ" if v else "fixed λ") if k == "trainable" else f"{names[k]} {v:g}" if
                          isinstance(v, float) else f"{names[k]} {v}" for k, v in zip(other, combo))
        ax.errorbar([r[x_name] for r in members], [r["mean"] for r in members],
                    yerr=[r["std"] or 0.0 for r in members], marker="o", capsize=4, color=f"C{i}", label=label)
    for j, r in enumerate(r for r in rows if r["model"] != "gpam" and r["mean"] is not None):
        color = ["0.35", "tab:brown", "tab:pink"][j % 3]
        std = r["std"] or 0.0
        ax.axhspan(r["mean"] - std, r["mean"] + std, color=color, alpha=0.18, lw=0)
        ax.axhline(r["mean"], color=color, ls="--", lw=1.2,
                   label=f"{r['model']}: mean ± std over seeds {', '.join(map(str, r['seeds']))}")
    if tied:
        xlabel = "λ (λ+ = λ−)"
    else:
        xlabel = names[x_name]
    if any(r["model"] == "gpam" and r["trainable"] for r in rows):
        xlabel += " (initial value where trainable)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{title} ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "results.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
