"""The benchmark's output: progress lines, CSV files, Markdown tables and the plot.

``ops.csv`` has the ``OPS_FIELDS`` of the ops level, ``benchmark.csv`` the ``FIELDS`` of the
timed levels; ``benchmark.md`` their tables (:func:`ops_table`, :func:`timing_table`) under the
command and the environment; ``benchmark.png`` every row's ratio to stock fairseq.
"""

import csv
import math
import platform
import time
from datetime import datetime, timezone
from typing import List, Sequence

import torch

from gpam_fairseq.measurement.benchmark.inputs import LEVELS

FIELDS = ("level", "shape", "device", "dtype", "variant", "path", "batch", "length", "embed_dim",
          "heads", "causal", "median_ms", "throughput", "throughput_unit", "peak_mem_mb",
          "time_ratio", "mem_ratio", "note")
OPS_FIELDS = ("level", "shape", "variant", "path", "kernels_forward", "kernels_backward", "kernels",
              "kernel_ratio", "host_syncs", "saved_mib", "saved_ratio", "note")


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(value, digits=2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def write_csv(rows: List[dict], path: str, fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("n/a" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in fields})


def ops_table(rows: List[dict]) -> str:
    head = ("| row | path | variant | kernels fwd + bwd | × stock | host syncs | saved for backward | × stock |\n"
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        saved = f"{fmt(r['saved_mib'], 1)} MiB" if r["saved_mib"] == r["saved_mib"] else "n/a (no backward)"
        lines.append(f"| {r['shape']} | {r['path']} | {r['variant']} | {r['kernels_forward']} + {r['kernels_backward']}"
                     f" = {r['kernels']} | {fmt(r['kernel_ratio'])} | {r['host_syncs']} | {saved} | "
                     f"{fmt(r['saved_ratio'])} |" + (f" {r['note']}" if r["note"] else ""))
    return head + "\n".join(lines) + "\n"


def timing_table(rows: List[dict]) -> str:
    head = ("| level | shape | dtype | variant | path | B×T | median ms | throughput | peak MiB | × stock time | × stock mem |\n"
            "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        tp = (f"{fmt(r['throughput'], 0 if r['throughput'] >= 100 else 2)} {r['throughput_unit']}"
              if r["throughput"] == r["throughput"] else "n/a")
        lines.append(
            f"| {r['level']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['path']} | "
            f"{r['batch']}×{r['length']} | {fmt(r['median_ms'])} | {tp} | {fmt(r['peak_mem_mb'], 1)} | "
            f"{fmt(r['time_ratio'])} | {fmt(r['mem_ratio'])} |" + (f" {r['note']}" if r["note"] else "")
        )
    return head + "\n".join(lines) + "\n"


def environment() -> str:
    import fairseq

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {dev}, {torch.get_num_threads()} CPU threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}, fairseq {fairseq.__version__}")


def write_plot(ops_rows: List[dict], timed_rows: List[dict], path: str) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq turns DEBUG on
    import matplotlib.pyplot as plt

    panels = []
    if ops_rows:
        panels.append(("ops: kernels", [r for r in ops_rows if r["variant"] != "stock"], "kernel_ratio",
                       "kernels relative to stock fairseq", None))
        panels.append(("ops: saved for backward", [r for r in ops_rows if r["variant"] != "stock"
                                                   and r["saved_ratio"] == r["saved_ratio"]], "saved_ratio",
                       "saved bytes relative to stock fairseq", None))
    # the targets: words/s >= 0.95x stock, beam <= 1.15x
    targets = {"train": 1 / 0.95, "beam": 1.15}
    for level in LEVELS[1:]:
        sel = [r for r in timed_rows if r["level"] == level]
        if sel:
            base = "one SDPA call" if level == "core" else "stock fairseq"
            panels.append((f"{level} ({sel[0]['device']})", sel, "time_ratio",
                           f"time relative to {base} (lower is faster)", targets.get(level)))
    if not panels:
        return
    height = sum(0.2 * len(p[1]) + 1.4 for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False)
    for ax, (title, sel, key, xlabel, target) in zip(axes[:, 0], panels):
        labels = [f"{r['shape']} {r.get('dtype', '')} {r['variant']}/{r['path']}" for r in sel]
        values = [r[key] if r[key] == r[key] else 0.0 for r in sel]
        colors = ["grey" if r["variant"] in ("stock", "sdpa") else "tab:blue" if r["variant"] == "softmax"
                  else "tab:red" if r["variant"] == "dagpam" else "tab:green" for r in sel]
        ax.barh(range(len(sel)), values, color=colors)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        if target:
            ax.axvline(target, color="tab:orange", lw=0.8, ls="--", label=f"target {target:.2f}×")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
