"""Box-size bins: equal-count quantile bins of ``sqrt(w * h)`` (10 by default, as in the
DK paper's t-SNE by object size), COCO's small/medium/large, or explicit edges."""
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ErfLabError

SizeBins = Union[str, Sequence[float], None]

#: COCO's object-size thresholds on sqrt(area): small < 32, medium < 96, large.
COCO_SIZE_EDGES = [0.0, 32.0, 96.0, float("inf")]


def quantile_edges(reference: np.ndarray, n: int) -> List[float]:
    """``n + 1`` edges splitting ``reference`` into ``n`` bins of (as nearly as ties allow) equal count.

    Sizes are often discrete (pixel boxes), so inner edges are placed half-way between two
    consecutive distinct sizes, at the cut whose count below is nearest to ``k * N / n``;
    the outer edges are the minimum and maximum.
    """
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise ErfLabError("size bins: no object sizes to compute quantile edges from")
    values, counts = np.unique(ref, return_counts=True)
    if values.size < n:
        warnings.warn(f"erf-lab: only {values.size} distinct object sizes; using {values.size} size bins, not {n}")
        n = max(1, int(values.size))
    if values.size == 1:
        return [float(values[0]), float(values[0])]
    below = np.cumsum(counts)[:-1]  # items <= values[i], for cuts between values[i] and values[i+1]
    mids = (values[:-1] + values[1:]) / 2.0
    edges = [float(values[0])]
    last = -1
    for k in range(1, n):
        i = int(np.argmin(np.abs(below - k * ref.size / n)))
        i = max(i, last + 1)  # keep edges strictly increasing
        i = min(i, mids.size - (n - k))
        edges.append(float(mids[i]))
        last = i
    edges.append(float(values[-1]))
    return edges


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
            return quantile_edges(reference, n)
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
