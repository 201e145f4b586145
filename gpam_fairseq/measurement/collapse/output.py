"""The collapse analysis's CSV files, and its per-layer curves (residual ratio, cosine, ||dL/dW_Q||).

Every row of PREFIX.csv is one (attention type, seed, stack, layer); the PNG has three panels
against the layer, one line per attention type (mean over seeds).
"""

import csv
import os
from typing import Dict, Iterable, List, Optional, Sequence

FIELDS = ["label", "attention_type", "lambda_pos", "lambda_neg", "neg_query_init", "seed", "stack", "layer", "norm",
          "residual_ratio", "mean_cosine", "grad_norm_wq", "state_rms"]


def write_csv(rows: Iterable[dict], path: str, fields: Sequence[str] = FIELDS) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


PANELS = [("residual_ratio", "residual ratio ||res(X)|| / ||X||", True),
          ("mean_cosine", "mean pairwise cosine similarity", False),
          ("grad_norm_wq", "||dL / dW_Q||", True)]


def number(v) -> Optional[float]:
    if v is None or v == "":
        return None
    return float(v)


def _draw_curves(axes, rows: List[dict], legend: bool = True) -> None:
    """The three panels of :data:`PANELS` on ``axes``: one line per (label, stack), mean over seeds."""
    groups: Dict[tuple, Dict[int, List[float]]] = {}
    for r in rows:
        for key, _, _ in PANELS:
            v = number(r.get(key))
            if v is None or v != v:
                continue
            groups.setdefault((r["label"], r["stack"], key), {}).setdefault(int(r["layer"]), []).append(v)
    labels = list(dict.fromkeys((r["label"], r["stack"]) for r in rows))
    labels.sort(key=lambda x: x[1])
    stacks = {s for _, s in labels}
    for ax, (key, ylabel, log) in zip(axes, PANELS):
        for label, stack in labels:
            data = groups.get((label, stack, key))
            if not data:
                continue
            xs = sorted(data)
            ys = [sum(data[x]) / len(data[x]) for x in xs]
            if log:
                ys = [max(y, 1e-300) for y in ys]
            name = label if len(stacks) == 1 else f"{label} ({stack})"
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layer (0 = input)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if legend:
        axes[0].legend(fontsize=7)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot(rows: List[dict], path: str, title: str = "", facet: Optional[str] = None) -> None:
    """Three panels (residual ratio, cosine, ||dL/dW_Q|| against the layer), one line per label;
    ``facet``: a column of the rows (e.g. neg_query_init) that gets one row of panels per value
    (the rows without a value, the reference types, are drawn in every one)."""
    plt = pyplot()
    values = [None] if facet is None else sorted({r.get(facet) for r in rows if r.get(facet)}) or [None]
    fig, axes = plt.subplots(len(values), 3, figsize=(15, 4.2 * len(values)), squeeze=False)
    for row_axes, value in zip(axes, values):
        mine = rows if value is None else [r for r in rows if r.get(facet) in (value, None, "")]
        _draw_curves(row_axes, mine)
        if value is not None:
            row_axes[0].set_title(f"{facet} = {value}", fontsize=9, loc="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
