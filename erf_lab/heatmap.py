"""ERF heatmaps: colour bar, the unit's RF centre marked, its theoretical RF outlined.

matplotlib is imported here only (never by ``import erf_lab``).
"""
import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["plot_erf", "save_erf_figure", "MAX_DRAWN_PIXELS"]

#: Longest side drawn at full resolution; larger maps are drawn from block means.
MAX_DRAWN_PIXELS = 1024


def _block_mean(m: np.ndarray, f: int) -> np.ndarray:
    h, w = m.shape
    p = np.full((-(-h // f) * f, -(-w // f) * f), np.nan)
    p[:h, :w] = m
    return np.nanmean(p.reshape(p.shape[0] // f, f, p.shape[1] // f, f), axis=(1, 3))


def plot_erf(
    result: Any,
    ax=None,
    *,
    normalize: Any = "preset",
    cmap: str = "viridis",
    mark_center: bool = True,
    show_trf: bool = True,
    colorbar: bool = True,
    overlay: bool = False,
    alpha: float = 0.6,
    title: Optional[str] = None,
):
    """Draws ``result`` (an :class:`~erf_lab.erf.ERFResult`) on ``ax`` (a new figure when None).

    ``overlay=True`` draws the map over ``result.image`` (instance ERFs). Returns the axes.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 4.5))
    data = result.display() if normalize == "preset" else result.display(normalize)
    h, w = data.shape
    # Maps larger than any screen are drawn from their means over f x f blocks (what the figure's
    # resampling would show anyway), in the map's own pixel coordinates.
    f = max(1, math.ceil(max(h, w) / MAX_DRAWN_PIXELS))
    shown = data if f == 1 else _block_mean(data, f)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5) if f > 1 else None
    if overlay and result.image is not None:
        img = np.asarray(result.image)
        ax.imshow(img if img.ndim == 3 and img.shape[-1] == 3 else img.squeeze(), cmap=None if img.ndim == 3 and img.shape[-1] == 3 else "gray",
                  extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        im = ax.imshow(shown, cmap=cmap, alpha=alpha, extent=extent)
    else:
        im = ax.imshow(shown, cmap=cmap, extent=extent)
    cy, cx = result.center
    if mark_center:
        ax.plot([cx], [cy], marker="+", color="red", markersize=12, mew=2, label="RF centre")
    rf = result.meta.get("rf_size")
    if show_trf and rf is not None and None not in rf and all(math.isfinite(v) for v in rf):
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((cx - rf[1] / 2, cy - rf[0] / 2), rf[1], rf[0], fill=False, ec="white", ls="--", lw=1.2))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    meta = result.meta
    ax.set_title(title or f"ERF {meta.get('layer') or 'output'} unit {tuple(meta.get('unit', ()))} "
                 f"({meta.get('preset', '')}, n={result.n_images})", fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def save_erf_figure(result: Any, path: Union[str, Path], **kwargs) -> Path:
    """Renders ``result`` to a PNG at ``path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_write

    # A standalone Agg figure: no pyplot state, the user's backend is left alone.
    fig = Figure(figsize=(5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plot_erf(result, ax=ax, **kwargs)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return Path(path)
