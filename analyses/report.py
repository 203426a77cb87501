"""Figures and the self-contained HTML report of a t-SNE analysis.

The figures use matplotlib's object API on an Agg canvas (no pyplot state, no display
needed). The HTML page embeds every PNG as a ``data:`` URI and has no scripts, styles or
fonts from elsewhere: one file that can be mailed or archived.
"""
import html
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from erf_lab.html import figure_png, img_tag, page, table

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .results import ModelEmbedding, TSNEResult

__all__ = ["plot_embedding", "figure_png", "render_html", "COLORINGS", "size_bin_names"]

COLORINGS = ("class", "size")
_TITLES = {"class": "coloured by class", "size": "coloured by box-size bin"}
_UNKNOWN = "#c8c8c8"


def size_bin_names(edges: Optional[Sequence[float]], n_bins: int) -> List[str]:
    """Legend text of each size bin: ``"12-15 px"`` from the edges, else ``"bin 3"``."""
    if not edges or len(edges) != n_bins + 1:
        return [f"bin {b}" for b in range(n_bins)]

    def fmt(v: float) -> str:
        return "inf" if not np.isfinite(v) else (f"{v:.0f}" if v >= 10 else f"{v:.1f}")

    return [f"{fmt(edges[b])}-{fmt(edges[b + 1])} px" for b in range(n_bins)]


def _palette(kind: str, n: int) -> List[Any]:
    from matplotlib import colormaps

    if kind == "size":  # ordered bins: a sequential map, small = dark
        cmap = colormaps["viridis"]
        return [cmap(v) for v in (np.linspace(0.0, 0.95, n) if n > 1 else [0.5])]
    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    cmap = colormaps["turbo"]
    return [cmap(v) for v in np.linspace(0.05, 0.95, n)]


def plot_embedding(
    emb: "ModelEmbedding",
    color: Sequence[str] = COLORINGS,
    *,
    class_names: Sequence[str] = (),
    size_bin_edges: Optional[Sequence[float]] = None,
    panel_size: float = 4.6,
) -> "Figure":
    """One row of panels (one per colouring) of a model's 2-D embedding, with legends.

    Every model gets the same styling (marker size from the point count, palettes, layout),
    so panels of different models compare at a glance.
    """
    from matplotlib.figure import Figure

    for c in color:
        if c not in COLORINGS:
            raise ValueError(f"colouring must be one of {', '.join(COLORINGS)}, got {c!r}")
    coords = emb.coords
    n = len(coords)
    marker = float(np.clip(6000.0 / max(n, 1), 1.0, 12.0))
    fig = Figure(figsize=(panel_size * len(color) + 1.6 * len(color), panel_size), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(color), squeeze=False)[0]
    for ax, kind in zip(axes, color):
        values = emb.labels if kind == "class" else emb.size_bins
        k = int(values.max()) + 1 if (values >= 0).any() else 0
        if kind == "class":
            names = list(class_names) if len(class_names) >= k else [str(i) for i in range(k)]
        else:
            names = size_bin_names(size_bin_edges, k)
        colors = _palette(kind, k)
        unknown = values < 0
        if unknown.any():
            ax.scatter(coords[unknown, 0], coords[unknown, 1], s=marker, c=_UNKNOWN, lw=0, label="unknown", rasterized=True)
        order = np.random.default_rng(0).permutation(np.flatnonzero(~unknown))  # no label painted last everywhere
        if len(order):
            ax.scatter(coords[order, 0], coords[order, 1], s=marker, c=[colors[v] for v in values[order]], lw=0, alpha=0.8,
                       rasterized=True)
        for v in range(k):  # legend proxies, one per label present or not
            ax.scatter([], [], s=30, color=colors[v], label=names[v])
        ax.set_title(f"{emb.name}: {_TITLES[kind]}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
        for spine in ax.spines.values():  # t-SNE axes carry no units
            spine.set_color("#dddddd")
        if k or unknown.any():
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False, markerscale=1.0,
                      title="class" if kind == "class" else "box size", title_fontsize=8, handletextpad=0.2)
    return fig


_SCORE_HELP = [
    ("kNN acc", "accuracy of a 10-nearest-neighbour vote in 5-fold stratified cross-validation; read it against "
                "<em>chance</em>, the accuracy of always answering the most frequent label"),
    ("silhouette", "mean silhouette coefficient of the labels as clusters, in [-1, 1]; 0 means no separation"),
    ("AMI", "adjusted mutual information between k-means clusters (k = number of labels) and the labels; "
            "0 = chance agreement, 1 = the same partition"),
    ("trustworthiness", "how far the t-SNE map's 10 nearest neighbours are also near in feature space "
                        "(1 = no false neighbours); subsampled"),
    ("size|class", "size bins recomputed inside each class and scored per class (weighted mean): the size effect "
                   "that a class/size correlation in the data cannot fake"),
]


def _summary_rows(result: "TSNEResult") -> List[List[Any]]:
    df = result.scores
    rows = []
    for m in result.models:
        row: List[Any] = [m.name]
        for lab in ("class", "size", "size|class"):
            for space in ("features", "embedding"):
                sel = df[(df.model == m.name) & (df.labels == lab) & (df.space == space)]
                row.append(float(sel.knn_acc.iloc[0]) if len(sel) else None)
            sel = df[(df.model == m.name) & (df.labels == lab)]
            row.append(float(sel.chance.iloc[0]) if len(sel) else None)
        sel = df[(df.model == m.name) & (df.space == "embedding")]
        row.append(float(sel.trustworthiness.iloc[0]) if len(sel) else None)
        rows.append(row)
    return rows


def render_html(result: "TSNEResult", pngs: Dict[str, bytes], title: str = "erf-lab t-SNE report") -> str:
    """The report page: overview, score summary and full table, one figure per model, metadata.

    Args:
        result: the analysis.
        pngs: PNG bytes per model name (:func:`figure_png` of :func:`plot_embedding`).
        title: page title.
    """
    from erf_lab.io import dumps

    meta = result.meta
    opts = meta.get("options", {})
    overview = {
        "data": f"{meta.get('data', '?')} (split {meta.get('split', '?')})",
        "samples": ", ".join(f"{m.name}: {len(m.coords)}" for m in result.models),
        "features": ", ".join(f"{m.name}: {m.meta.get('features', {}).get('layer', '?')} "
                              f"({m.meta.get('features', {}).get('pooling', '?')} pooling, "
                              f"{m.meta.get('features', {}).get('dim', '?')} dims)" for m in result.models),
        "embedding": ", ".join(f"{m.name}: PCA {m.meta.get('embedding', {}).get('pca', {}).get('dim', '?')} -> t-SNE "
                               f"({m.meta.get('embedding', {}).get('backend', '?')}, perplexity "
                               f"{m.meta.get('embedding', {}).get('perplexity', '?')}, "
                               f"{m.meta.get('embedding', {}).get('n_iter', '?')} iterations)" for m in result.models),
        "seed": opts.get("seed", meta.get("seed", "?")),
        "created": meta.get("created", "?"),
    }
    parts = [
        '<p class="muted">t-SNE projections of pooled features, coloured by class and by object box size '
        "(Gao et al., Deformable Kernels, ICLR 2020, section 5.3), with the scores that back the pictures.</p>",
        "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in overview.items()) + "</dl>",
        "<h2>Summary: kNN accuracy</h2>",
        table(["model", "class: features", "class: t-SNE", "class: chance", "size: features", "size: t-SNE",
                "size: chance", "size|class: features", "size|class: t-SNE", "size|class: chance", "trustworthiness"],
               _summary_rows(result)),
        "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in _SCORE_HELP) + "</dl>",
        "<h2>All scores</h2>",
        table(["model", "labels", "space", "n", "labels (#)", "kNN acc", "chance", "silhouette", "AMI",
                "trustworthiness"], result.scores.values.tolist(), left=3),
        "<h2>Projections</h2>",
    ]
    for m in result.models:
        png = pngs.get(m.name)
        if png is None:
            continue
        parts.append(f"<h3>{html.escape(m.name)}</h3>")
        parts.append(img_tag(png, f"t-SNE of {m.name}"))
    parts += ["<h2>Metadata</h2>", f"<pre>{html.escape(dumps(result.to_json()))}</pre>"]
    return page(title, parts)
