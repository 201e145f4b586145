"""The lambda map: daGPAM's rows over the (lambda+, lambda-) grid summarised per point and layer
(geometric means over seeds), as text tables and as heat maps (residual ratio at chosen layers,
the first layer that has collapsed to float64's floor, layer 1's ||dL/dW_Q||), trained lambdas
marked on them."""

import math
import os
from typing import Dict, List, Optional, Sequence

from gpam_fairseq.measurement.collapse.grid import breaks_row_sum
from gpam_fairseq.measurement.collapse.output import number, pyplot, save_figure

MAP_FIELDS = ["neg_query_init", "stack", "lambda_pos", "lambda_neg", "row_sum", "layer", "seeds",
              "residual_ratio_gmean", "residual_ratio_min", "residual_ratio_max", "grad_norm_wq_gmean", "state_rms_gmean"]
COLLAPSED = 1e-12  # a residual ratio below this is rank one up to float64 rounding (its floor is ~2e-16)


def _gmean(values: List[float]) -> float:
    """Geometric mean; NaN when one value is NaN (an overflowed stack), 0 when one is 0."""
    if any(v != v for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarise_grid(rows: List[dict]) -> List[dict]:
    """One row per (W_Q- init, stack, lambda+, lambda-, layer) of the grid's daGPAM rows, over
    seeds: geometric means (ratios and norms span many decades), and the residual's range."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r.get("attention_type") != "dagpam" or r.get("lambda_pos") in (None, ""):
            continue
        key = (r["neg_query_init"], r["stack"], float(r["lambda_pos"]), float(r["lambda_neg"]), int(r["layer"]))
        groups.setdefault(key, []).append(r)
    out = []
    for (init, stack, p, n, layer), mine in sorted(groups.items()):
        ratios = [float(r["residual_ratio"]) for r in mine]
        grads = [number(r["grad_norm_wq"]) for r in mine]
        rms = [number(r.get("state_rms")) for r in mine]
        out.append(dict(neg_query_init=init, stack=stack, lambda_pos=p, lambda_neg=n, row_sum=1 + p - n, layer=layer,
                        seeds=len(mine), residual_ratio_gmean=_gmean(ratios), residual_ratio_min=min(ratios),
                        residual_ratio_max=max(ratios),
                        grad_norm_wq_gmean=None if None in grads else _gmean(grads),
                        state_rms_gmean=None if None in rms else _gmean(rms)))
    return out


def reference_summary(rows: List[dict]) -> Dict[tuple, Dict[int, float]]:
    """{(type, stack): {layer: geometric mean residual ratio}} of the rows outside the grid."""
    groups: Dict[tuple, Dict[int, List[float]]] = {}
    for r in rows:
        if r.get("lambda_pos") not in (None, ""):
            continue
        groups.setdefault((r["label"], r["stack"]), {}).setdefault(int(r["layer"]), []).append(float(r["residual_ratio"]))
    return {k: {l: _gmean(v) for l, v in d.items()} for k, d in groups.items()}


def first_collapsed_layer(summary: List[dict], init: str, stack: str, p: float, n: float) -> Optional[int]:
    """The first layer whose (geometric mean) residual ratio is below :data:`COLLAPSED`; None if none."""
    for r in sorted((r for r in summary if (r["neg_query_init"], r["stack"], r["lambda_pos"], r["lambda_neg"]) ==
                     (init, stack, p, n)), key=lambda r: r["layer"]):
        if r["layer"] > 0 and r["residual_ratio_gmean"] < COLLAPSED:
            return r["layer"]
    return None


DEFAULT_MAP_LAYERS = ("2", "4", "last")


def resolve_layers(spec: Sequence[str], last: int) -> List[int]:
    """The layers of --map-layers ('last' = ``last``); the default's layers beyond ``last`` are left out."""
    layers = []
    for item in spec:
        try:
            layer = last if item == "last" else int(item)
        except ValueError:
            raise SystemExit(f"--map-layers: expected layer numbers or 'last', got {item!r}") from None
        if not 1 <= layer <= last:
            if tuple(spec) == DEFAULT_MAP_LAYERS:
                continue
            raise SystemExit(f"--map-layers: layer {item} is outside 1..{last}")
        if layer not in layers:
            layers.append(layer)
    return layers


def map_tables(summary: List[dict], layers_spec: Sequence[str], references: Dict[tuple, Dict[int, float]]) -> List[str]:
    """The map as text tables (rows lambda+, columns lambda-), for the console and the raw output."""
    lines = []
    for init, stack in dict.fromkeys((r["neg_query_init"], r["stack"]) for r in summary):
        mine = [r for r in summary if (r["neg_query_init"], r["stack"]) == (init, stack)]
        pos = sorted({r["lambda_pos"] for r in mine})
        neg = sorted({r["lambda_neg"] for r in mine})
        last = max(r["layer"] for r in mine)
        at = {(r["lambda_pos"], r["lambda_neg"], r["layer"]): r for r in mine}
        refs = {label: d for (label, st), d in references.items() if st == stack}

        def table(title, value):
            lines.append(f"| {title} (W_Q- init {init}, stack {stack}; rows lambda+, columns lambda-; '-' = invalid)")
            lines.append("| lambda+ \\ lambda- | " + " | ".join(f"{n:g}" for n in neg) + " |")
            for p in pos:
                cells = [value(p, n) if (p, n, 1) in at else "-" for n in neg]
                lines.append(f"| {p:g} | " + " | ".join(cells) + " |")

        for layer in resolve_layers(layers_spec, last):
            ref = ", ".join(f"{label} {d[layer]:.1e}" for label, d in refs.items() if layer in d)
            table(f"residual ratio at layer {layer}, geometric mean over seeds" + (f" (reference: {ref})" if ref else ""),
                  lambda p, n, layer=layer: f"{at[(p, n, layer)]['residual_ratio_gmean']:.1e}")
        table(f"first layer with residual ratio < {COLLAPSED:g} ('none' = not within {last})",
              lambda p, n: str(first_collapsed_layer(summary, init, stack, p, n) or "none"))
        table("||dL/dW_Q|| of layer 1, geometric mean over seeds",
              lambda p, n: f"{at[(p, n, 1)]['grad_norm_wq_gmean']:.1e}")
        table(f"RMS of the states at layer {last}, geometric mean over seeds",
              lambda p, n: f"{at[(p, n, last)]['state_rms_gmean']:.1e}")
    return lines


def _grid_position(values: List[float], v: float) -> float:
    """Where the value v lies on an axis whose ticks 0, 1, ... are the sorted grid values
    (piecewise linear between them, beyond the ends by the last step)."""
    import numpy as np

    if len(values) == 1:
        return 0.0 + (v - values[0])
    if v <= values[0]:
        return (v - values[0]) / (values[1] - values[0])
    if v >= values[-1]:
        return len(values) - 1 + (v - values[-1]) / (values[-1] - values[-2])
    return float(np.interp(v, values, range(len(values))))


def plot_map(summary: List[dict], path: str, layers_spec: Sequence[str], trained: Sequence[dict] = (),
             title: str = "") -> None:
    """Heat maps over the grid (rows lambda+, columns lambda-), one row of panels per (W_Q-
    init, stack): log10 of the residual ratio at each layer of ``layers_spec``, then log10 of
    layer 1's ||dL/dW_Q||. Invalid points (lambda- >= 1 + lambda+) are grey; the line is the
    limit lambda- = 1 + lambda+; trained lambdas are the white dots (one per module or head)."""
    import numpy as np

    plt = pyplot()
    facets = list(dict.fromkeys((r["neg_query_init"], r["stack"]) for r in summary))
    last_of = {f: max(r["layer"] for r in summary if (r["neg_query_init"], r["stack"]) == f) for f in facets}
    ncols = max(len(resolve_layers(layers_spec, last)) for last in last_of.values()) + 2
    columns = max(len({r["lambda_neg"] for r in summary}), 1)
    width = max(4.3, 0.3 * columns + 1.6)
    fig, axes = plt.subplots(len(facets), ncols, figsize=(width * ncols, 3.9 * len(facets)), squeeze=False)
    for row_axes, facet in zip(axes, facets):
        mine = [r for r in summary if (r["neg_query_init"], r["stack"]) == facet]
        pos = sorted({r["lambda_pos"] for r in mine})
        neg = sorted({r["lambda_neg"] for r in mine})
        at = {(r["lambda_pos"], r["lambda_neg"], r["layer"]): r for r in mine}
        panels = [(f"residual ratio, layer {l}", "residual_ratio_gmean", l, (-16, 0))
                  for l in resolve_layers(layers_spec, last_of[facet])]
        panels.append((f"first layer with residual ratio < {COLLAPSED:g}", "first_collapsed", 1, None))
        panels.append(("||dL/dW_Q||, layer 1", "grad_norm_wq_gmean", 1, None))
        last = last_of[facet]
        for ax in row_axes[len(panels):]:
            ax.axis("off")
        for ax, (name, key, layer, limits) in zip(row_axes, panels):
            collapse_panel = key == "first_collapsed"
            grid = np.full((len(pos), len(neg)), np.nan)
            texts = {}
            for i, p in enumerate(pos):
                for j, n in enumerate(neg):
                    r = at.get((p, n, layer))
                    if r is None:
                        continue
                    if collapse_panel:
                        first = first_collapsed_layer(summary, facet[0], facet[1], p, n)
                        grid[i, j] = last + 1 if first is None else first
                        texts[i, j] = "none" if first is None else str(first)
                    elif r[key] is not None:
                        v = r[key]
                        texts[i, j] = "overflow" if v != v else f"{v:.1e}"
                        if v == v:
                            grid[i, j] = math.log10(max(v, 1e-300))
            cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
            if limits and np.isfinite(grid).any():  # ratios: down to the floor in pure stacks, near 1 with residuals
                limits = (max(min(math.floor(np.nanmin(grid)), -1), limits[0]), limits[1])
            vmin, vmax = limits or ((1, last + 1) if collapse_panel else (np.nanmin(grid), np.nanmax(grid)))
            image = ax.imshow(grid, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            fig.colorbar(image, ax=ax, label="layer" if collapse_panel else "log10", fraction=0.046)
            rotation = 90 if len(neg) > 6 else 0  # many columns: narrow cells
            for i, p in enumerate(pos):
                for j, n in enumerate(neg):
                    if breaks_row_sum(p, n):
                        ax.text(j, i, "invalid", ha="center", va="center", fontsize=6, color="#707070", rotation=rotation)
                    elif (i, j) in texts:
                        shade = (grid[i, j] - vmin) / ((vmax - vmin) or 1) if grid[i, j] == grid[i, j] else 1
                        ax.text(j, i, texts[i, j], ha="center", va="center", fontsize=6, rotation=rotation,
                                color="white" if shade < 0.5 else "black")
            # the limit lambda- = 1 + lambda+, drawn through the grid's coordinates
            ps = np.linspace(pos[0], pos[-1], 200) if len(pos) > 1 else np.array(pos)
            ax.plot([_grid_position(neg, 1 + p) for p in ps], [_grid_position(pos, p) for p in ps],
                    color="red", linewidth=1, label="lambda- = 1 + lambda+")
            for ckpt, marker in zip(dict.fromkeys(r["checkpoint"] for r in trained), "os^Dv<>p"):
                mine = [r for r in trained if r["checkpoint"] == ckpt]
                run_name = os.path.join(*os.path.normpath(ckpt).split(os.sep)[-4:-1])  # the run, not the file
                ax.scatter([_grid_position(neg, r["lambda_neg"]) for r in mine],
                           [_grid_position(pos, r["lambda_pos"]) for r in mine], marker=marker,
                           s=14, c="white", edgecolors="black", linewidths=0.6, zorder=5, label=f"trained lambda: {run_name}")
            ax.set_xlim(-0.5, len(neg) - 0.5)
            ax.set_ylim(-0.5, len(pos) - 0.5)
            ax.set_xticks(range(len(neg)))
            ax.set_xticklabels([f"{n:g}" for n in neg], fontsize=7)
            ax.set_yticks(range(len(pos)))
            ax.set_yticklabels([f"{p:g}" for p in pos], fontsize=7)
            ax.set_xlabel("lambda-")
            ax.set_ylabel("lambda+")
            ax.set_title(f"{name}\nW_Q- {facet[0]}, {facet[1]}", fontsize=8)
        row_axes[0].legend(fontsize=6, loc="lower right")  # over the invalid corner
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
