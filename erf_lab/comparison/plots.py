"""The comparison's figures: the grid of maps (rows: models, columns: layers x sizes; one colour
scale per column, each unit's theoretical RF drawn) and the growth curves of the ERF size
metrics against depth or epoch, with the theoretical RF and the sqrt(depth) reference.

Standalone Agg figures (no pyplot state; matplotlib is imported here only)."""
import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .result import ComparisonResult

__all__ = ["column_scale", "display_map", "grid_figure", "growth_figure"]


def display_map(m: np.ndarray, normalize: Optional[str]) -> np.ndarray:
    """What a grid cell shows: the map as a share of its total mass, scaled to a mean magnitude of 1
    (so maps of models whose gradients differ in scale compare by shape and spread), through
    log10(1 + x) of its positive part for the ``log_max`` display (RepLKNet's compression)."""
    m = np.asarray(m, dtype=np.float64)
    total = float(np.abs(m).sum())
    share = m / total * m.size if total > 0 else m
    return np.log10(1 + np.clip(share, 0, None)) if normalize == "log_max" else share


def column_scale(maps: Sequence[np.ndarray]) -> Tuple[float, float]:
    """(vmin, vmax) shared by the displayed maps of one column: 0 (or the lowest value, when negative)
    to the highest value over all of them."""
    finite = [m[np.isfinite(m)] for m in maps if m is not None and np.isfinite(m).any()]
    if not finite:
        return 0.0, 1.0
    lo = min(0.0, min(float(f.min()) for f in finite))
    hi = max(float(f.max()) for f in finite)
    return lo, hi if hi > lo else lo + 1.0


def _figure(w: float, h: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def grid_figure(result: "ComparisonResult") -> "Figure":
    """compare.png: the maps of every (model, column) on one colour scale per column."""
    from matplotlib.patches import Rectangle

    norm = result.meta.get("options", {}).get("normalize")
    rows, cols = len(result.models), len(result.columns)
    fig = _figure(2.3 * cols + 1.2, 2.2 * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, c in enumerate(result.columns):
        shown = [display_map(result.cells[(i, j)].map, norm) if (i, j) in result.cells else None for i in range(rows)]
        vmin, vmax = column_scale(shown)
        im = None
        for i in range(rows):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(result.models[i]["name"], fontsize=8)
            if i == 0:
                ax.set_title(c["label"], fontsize=9)
            if shown[i] is None:
                ax.text(0.5, 0.5, "failed", ha="center", va="center", transform=ax.transAxes, color="#a00")
                continue
            r = result.cells[(i, j)]
            im = ax.imshow(shown[i], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
            cy, cx = r.center
            ax.plot([cx], [cy], marker="+", color="red", markersize=7, mew=1.2)
            rf = r.meta.get("rf_size")
            if rf is not None and None not in rf and all(math.isfinite(v) for v in rf):
                ax.add_patch(Rectangle((cx - rf[1] / 2, cy - rf[0] / 2), rf[1], rf[0], fill=False, ec="white",
                                       ls="--", lw=0.9))
            h, w = shown[i].shape
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            layer = result.models[i]["layers"][c["slot"]]
            if layer != c["layer"]:
                ax.set_xlabel(layer, fontsize=7)
        if im is not None:
            fig.colorbar(im, ax=[axes[i][j] for i in range(rows)], fraction=0.05, pad=0.02, shrink=0.9)
    scale = "log10(1 + share of mass x pixels)" if norm == "log_max" else "share of mass x pixels"
    fig.suptitle(f"ERFs ({result.meta.get('preset', '')}, {scale}; one colour scale per column; "
                 f"dashed: theoretical RF)", fontsize=9)
    return fig


# (metric or metrics, title, theoretical RF drawn, sqrt(depth) line drawn)
_PANELS = (("luo_size", "Luo size (px) and theoretical RF side (dashed)", True, True),
           ("sigma", "sigma: sqrt(sigma_y sigma_x) about the RF centre (px)", False, True),
           (("radius_mass@0.5", "radius_mass@0.9"), "radius of 50% (solid) / 90% (dotted) mass (px)", False, False),
           (("area_ratio_replknet@0.2", "area_ratio_replknet@0.5"), "area ratio, t = 0.2 (solid) / 0.5 (dotted)",
            False, False))


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _series(result: "ComparisonResult") -> List[Tuple[str, List[Tuple[int, int]]]]:
    """Lines of the growth curve: (label, [(row, column) in x order])."""
    if result.axis == "epoch":
        rows = sorted(range(len(result.models)), key=lambda i: result.models[i]["epoch"])
        return [(c["label"], [(i, j) for i in rows]) for j, c in enumerate(result.columns)]
    sizes = sorted({tuple(c["image_size"]) for c in result.columns})
    out = []
    for i, m in enumerate(result.models):
        for hw in sizes:
            cols = [j for j, c in enumerate(result.columns) if tuple(c["image_size"]) == hw]
            label = m["name"] if len(sizes) == 1 else f"{m['name']} @ {hw[0]}x{hw[1]}"
            out.append((label, sorted(((i, j) for j in cols), key=lambda k: result.depth.get(k, 0))))
    return out


def growth_figure(result: "ComparisonResult") -> "Figure":
    """growth.png: ERF size metrics against depth (log-log, with the theoretical RF and a sqrt(depth)
    line through each curve's first point) or against the training epoch."""
    t = result.table()
    epoch = result.axis == "epoch"
    fig = _figure(11, 8)
    axes = fig.subplots(2, 2).ravel()
    series = _series(result)
    colors = [f"C{k % 10}" for k in range(len(series))]
    for ax, (metric, title, with_trf, with_sqrt) in zip(axes, _PANELS):
        metrics = metric if isinstance(metric, tuple) else (metric,)
        loglog, ticks = not epoch, set()
        for (label, keys), color in zip(series, colors):
            cells = [(k, t[(t.model == result.models[k[0]]["name"]) & (t.column == result.columns[k[1]]["label"])])
                     for k in keys if k in result.cells]
            if not cells:
                continue
            xs = np.array([result.models[k[0]]["epoch"] if epoch else result.depth.get(k, 0) for k, _ in cells], float)
            for q, name in enumerate(metrics):
                ys = np.array([float(row[name].iloc[0]) for _, row in cells])
                ax.plot(xs, ys, marker="o", ms=3, color=color, ls="-" if q == 0 else ":",
                        label=label if q == 0 else None)
                loglog = loglog and bool((xs > 0).all() and (ys > 0).all())
            if with_trf:
                trf = np.array([math.sqrt(_num(row.trf_y.iloc[0]) * _num(row.trf_x.iloc[0]))
                                if "trf_y" in row and _num(row.trf_y.iloc[0]) > 0 else math.nan for _, row in cells])
                if np.isfinite(trf).any():
                    ax.plot(xs, trf, color=color, ls="--", lw=0.8, alpha=0.7)
            if with_sqrt and not epoch and len(xs) > 1 and xs[0] > 0:
                y0 = float(cells[0][1][metrics[0]].iloc[0])
                ax.plot(xs, y0 * np.sqrt(xs / xs[0]), color="grey", ls="-.", lw=0.8)
            ticks.update(xs.tolist())
        if loglog:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.set_yscale("log")
            for a in (ax.xaxis, ax.yaxis):
                a.set_major_formatter(ScalarFormatter())
                a.set_minor_formatter(NullFormatter())
            ax.set_xticks(sorted(ticks))
        if epoch:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training epoch" if epoch else "depth (spatial layers)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    note = "; dash-dot: sqrt(depth) through each curve's first point" if not epoch else ""
    fig.suptitle(f"ERF growth ({result.meta.get('preset', '')}){note}", fontsize=9)
    fig.tight_layout()
    return fig
