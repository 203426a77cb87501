"""Box-size bins: equal-count quantile bins of ``sqrt(w * h)`` (10 by default, as in the
DK paper's t-SNE by object size), COCO's small/medium/large, or explicit edges."""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ErfLabError

SizeBins = Union[str, Sequence[float], None]

#: COCO's object-size thresholds on sqrt(area): small < 32, medium < 96, large.
COCO_SIZE_EDGES = [0.0, 32.0, 96.0, float("inf")]


def size_bin_edges(reference: np.ndarray, size_bins: SizeBins) -> List[float]:
    """``B + 1`` increasing bin edges for ``size_bins`` computed on ``reference`` sizes.

    ``size_bins`` is ``"quantileN"`` (``N`` equal-count bins; ``"quantile10"`` is the
    default), ``"coco"`` (small/medium/large: edges 0, 32, 96, inf on ``sqrt(w * h)``)
    or an explicit increasing sequence of edges.
    """
    if isinstance(size_bins, str):
        name = size_bins.strip().lower()
        if name == "coco":
            return list(COCO_SIZE_EDGES)
        if name.startswith("quantile"):
            try:
                n = int(name[len("quantile"):] or 10)
            except ValueError:
                n = 0
            if n < 1:
                raise ErfLabError(f"size bins {size_bins!r}: expected quantileN with N >= 1, e.g. quantile10")
            ref = np.asarray(reference, dtype=np.float64)
            ref = ref[np.isfinite(ref)]
            if ref.size == 0:
                raise ErfLabError("size bins: no object sizes to compute quantile edges from")
            return [float(e) for e in np.quantile(ref, np.linspace(0.0, 1.0, n + 1))]
        raise ErfLabError(f"size bins {size_bins!r}: expected 'quantileN' (e.g. quantile10), 'coco' or a list of edges")
    edges = [float(e) for e in size_bins]  # type: ignore[union-attr]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ErfLabError(f"size bins {edges}: explicit edges must be at least two strictly increasing numbers")
    return edges


def bin_of(sizes: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index of each size: ``edges[b] <= size < edges[b + 1]``; sizes outside the edges
    fall into the first or last bin; NaN sizes get -1."""
    sizes = np.asarray(sizes, dtype=np.float64)
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    out = np.searchsorted(inner, sizes, side="right").astype(np.int64)
    out[~np.isfinite(sizes) & ~np.isinf(sizes)] = -1
    return out


def assign_size_bins(
    sizes: np.ndarray, size_bins: SizeBins, reference: Optional[np.ndarray] = None
) -> Tuple[List[float], np.ndarray]:
    """Edges (computed on ``reference``, default ``sizes``) and the bin of each size."""
    edges = size_bin_edges(sizes if reference is None else reference, size_bins)
    return edges, bin_of(sizes, edges)
