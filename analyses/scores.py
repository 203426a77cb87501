"""How strongly a point set groups by a labelling: the numbers behind a t-SNE picture.

For a labelling (class, or box-size bin) of points in a space (the raw features, or the 2-D
embedding):

* ``knn_acc``: accuracy of a k-nearest-neighbour vote (k = 10, Euclidean) in stratified
  k-fold cross-validation (5 folds, seeded). ``chance`` is the accuracy of always answering
  the most frequent label: the floor ``knn_acc`` is read against.
* ``silhouette``: mean silhouette coefficient of the labels as clusters (Euclidean; on a
  seeded subsample of at most ``silhouette_max`` points). In [-1, 1]; 0 = no separation.
* ``ami_kmeans``: adjusted mutual information between k-means clusters (k = number of
  labels, seeded) and the labels. 0 = no agreement beyond chance, 1 = identical partitions.
* ``trustworthiness`` (of an embedding, not of a labelling): how far the embedding's
  10 nearest neighbours are also near in the feature space (Venna & Kaski 2001; on a seeded
  subsample of at most ``trust_max`` points to keep memory bounded). 1 = no intrusions.

``size|class``: the size effect within each class. Size bins are recomputed inside every
class (quantiles of that class's sizes) and the scores above are computed per class and
averaged with weights = class counts. A data set where big objects are mostly of one class
makes size bins predictable from class alone; the within-class scores are immune to that.

All scores are invariant to a common rescaling (and translation) of the space.
"""
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from erf_lab.errors import ErfLabError

__all__ = [
    "knn_accuracy",
    "knn_accuracies",
    "knn_hits",
    "within_class_knn_hits",
    "silhouette",
    "kmeans_ami",
    "trustworthiness",
    "within_class_bins",
    "score_space",
    "score_table",
    "SCORE_COLUMNS",
]

#: Columns of the score table (one row per model x labelling x space).
SCORE_COLUMNS = ["model", "labels", "space", "n", "n_labels", "knn_acc", "chance", "silhouette", "ami_kmeans",
                 "trustworthiness"]

K = 10
N_SPLITS = 5
SMALL = 1_000_000  # array elements below which scores run on one thread


def _threads_for(x: np.ndarray):
    """One thread for small arrays (OpenMP/BLAS barriers cost more than they save there, badly so
    on a busy machine); the caller's limit otherwise."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1 if np.asarray(x).size < SMALL else None)


def _valid(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels) >= 0


def _chance(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / counts.sum())


def knn_accuracies(
    x: np.ndarray, labelings: Mapping[str, np.ndarray], *, k: int = K, n_splits: int = N_SPLITS, seed: int = 0
) -> Dict[str, Tuple[float, float]]:
    """``{name: (knn accuracy, chance)}`` for several labellings of the same points.

    The folds are shared, so the neighbour search runs once per fold for all labellings; they
    are stratified on the joint labels when every joint stratum fills the folds, else on the
    first labelling. Points with a negative label in any labelling are left out; a
    labelling with fewer than two labels of at least two points each gets NaN.
    """
    hits = knn_hits(x, labelings, k=k, n_splits=n_splits, seed=seed)
    return {n: (float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"), c) for n, (h, c) in hits.items()}


def knn_hits(
    x: np.ndarray, labelings: Mapping[str, np.ndarray], *, k: int = K, n_splits: int = N_SPLITS, seed: int = 0
) -> Dict[str, Tuple[np.ndarray, float]]:
    """``{name: (hits, chance)}``: per point, 1.0 when its cross-validated k-NN vote (see
    :func:`knn_accuracies`) is right, 0.0 when wrong, NaN when the point is left out; the
    mean of the hits is the k-NN accuracy (the unit a bootstrap over points resamples)."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import NearestNeighbors

    x_all = np.asarray(x, dtype=np.float32 if np.asarray(x).shape[1] > 3 else np.float64)
    names = list(labelings)
    ys_all = np.stack([np.asarray(labelings[n], dtype=np.int64) for n in names], 1)
    keep = (ys_all >= 0).all(1)
    x, ys = x_all[keep], ys_all[keep]
    nan_hits = np.full(len(x_all), np.nan)
    out = {n: (nan_hits.copy(), float("nan")) for n in names}
    if len(x) < 4:
        return out
    counts = [np.unique(ys[:, j], return_counts=True)[1] for j in range(len(names))]
    usable = [len(c) >= 2 and c.min() >= 2 for c in counts]
    if not any(usable):
        return out
    folds = int(min(n_splits, min(c.min() for c, u in zip(counts, usable) if u)))
    folds = max(folds, 2)
    joint, joint_counts = np.unique(ys, axis=0, return_inverse=True, return_counts=True)[1:]
    strata = joint.reshape(-1)
    if joint_counts.min() < folds:  # joint strata too thin: stratify on the first usable labelling
        strata = ys[:, usable.index(True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, strata))
    hit = np.zeros((len(x), len(names)))
    for train, test in splits:
        kk = min(k, len(train))
        algorithm = "brute" if x.shape[1] > 15 else "auto"
        nn = NearestNeighbors(n_neighbors=kk, algorithm=algorithm).fit(x[train])
        neigh = nn.kneighbors(x[test], return_distance=False)
        for j in range(len(names)):
            votes = ys[train][neigh, j]  # (n_test, k)
            n_lab = int(ys[:, j].max()) + 1
            tally = np.zeros((len(test), n_lab), np.int64)
            np.add.at(tally, (np.repeat(np.arange(len(test)), kk), votes.reshape(-1)), 1)
            hit[test, j] = tally.argmax(1) == ys[test, j]  # ties: the smallest label, as sklearn
    for j, n in enumerate(names):
        if usable[j]:
            full = nan_hits.copy()
            full[keep] = hit[:, j]
            out[n] = (full, _chance(ys[:, j]))
    return out


def within_class_knn_hits(x: np.ndarray, classes: np.ndarray, bins: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Per point, the hit of the ``size|class`` k-NN score: the size-bin vote among the points of
    its own class (NaN for points not scored); the mean is the score's weighted class mean."""
    out = np.full(len(x), np.nan)
    for c in np.unique(classes[(classes >= 0) & (bins >= 0)]):
        m = (classes == c) & (bins >= 0)
        out[np.nonzero(m)[0]] = knn_hits(np.asarray(x)[m], {"size": bins[m]}, seed=seed)["size"][0]
    return out


def knn_accuracy(x: np.ndarray, labels: np.ndarray, *, k: int = K, n_splits: int = N_SPLITS, seed: int = 0) -> Tuple[float, float]:
    """``(accuracy, chance)`` of a k-NN vote in stratified cross-validation (see the module docstring)."""
    return knn_accuracies(x, {"y": labels}, k=k, n_splits=n_splits, seed=seed)["y"]


def _subsample(n: int, max_n: Optional[int], seed: int) -> np.ndarray:
    if max_n is None or n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


def silhouette(x: np.ndarray, labels: np.ndarray, *, max_samples: Optional[int] = 5000, seed: int = 0,
               distances: Optional[np.ndarray] = None) -> float:
    """Mean silhouette coefficient (NaN with fewer than 2 labels or as many labels as points).

    ``distances`` (precomputed pairwise distances of ``x``) skips the distance computation;
    then ``max_samples`` is not applied.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    keep = _valid(labels)
    if distances is None:
        idx = np.flatnonzero(keep)
        idx = idx[_subsample(len(idx), max_samples, seed)]
        x, labels = np.asarray(x)[idx], labels[idx]
    else:
        distances, labels = distances[np.ix_(keep, keep)], labels[keep]
    n_lab = len(np.unique(labels))
    if n_lab < 2 or n_lab >= len(labels):
        return float("nan")
    if distances is not None:
        return float(silhouette_score(distances, labels, metric="precomputed"))
    return float(silhouette_score(x, labels, metric="euclidean"))


def kmeans_ami(x: np.ndarray, labels: np.ndarray, *, seed: int = 0, n_init: int = 4) -> float:
    """Adjusted mutual information between k-means (k = number of labels) and the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score

    labels = np.asarray(labels)
    keep = _valid(labels)
    x, labels = np.asarray(x, dtype=np.float64)[keep], labels[keep]
    n_lab = len(np.unique(labels))
    if n_lab < 2 or len(labels) <= n_lab:
        return float("nan")
    with _threads_for(x):
        pred = KMeans(n_clusters=n_lab, n_init=n_init, random_state=seed).fit_predict(x)
    return float(adjusted_mutual_info_score(labels, pred))


def trustworthiness(x: np.ndarray, y: np.ndarray, *, k: int = K, max_samples: Optional[int] = 2000, seed: int = 0) -> float:
    """Trustworthiness of embedding ``y`` of ``x`` with ``k`` neighbours, on a seeded subsample."""
    from sklearn.manifold import trustworthiness as _trust

    idx = _subsample(len(x), max_samples, seed)
    if len(idx) < 2 * k + 2:
        k = max(1, (len(idx) - 1) // 2 - 1)
    if k < 1:
        return float("nan")
    return float(_trust(np.asarray(x, dtype=np.float64)[idx], np.asarray(y, dtype=np.float64)[idx], n_neighbors=k))


def within_class_bins(labels: np.ndarray, sizes: np.ndarray, n_bins: int = 10, min_per_bin: int = 10) -> np.ndarray:
    """Size bins recomputed inside each class: quantiles of that class's sizes.

    A class gets ``min(n_bins, count // min_per_bin)`` bins (fewer when its sizes have fewer
    distinct values); classes left with fewer than 2 bins, unlabelled points and unknown
    sizes get -1.
    """
    from erf_lab.data.bins import bin_of, quantile_edges

    labels, sizes = np.asarray(labels), np.asarray(sizes, dtype=np.float64)
    out = np.full(len(labels), -1, np.int64)
    for c in np.unique(labels[labels >= 0]):
        m = (labels == c) & np.isfinite(sizes)
        b = min(n_bins, int(m.sum()) // min_per_bin, len(np.unique(sizes[m])))
        if b < 2:
            continue
        out[m] = bin_of(sizes[m], quantile_edges(sizes[m], b))
    return out


def _space_scores(x: np.ndarray, labelings: Mapping[str, np.ndarray], seed: int, silhouette_max: int) -> Dict[str, Dict[str, float]]:
    with _threads_for(x):
        return _space_scores_(x, labelings, seed, silhouette_max)


def _space_scores_(x: np.ndarray, labelings: Mapping[str, np.ndarray], seed: int, silhouette_max: int) -> Dict[str, Dict[str, float]]:
    from sklearn.metrics import pairwise_distances

    names = [n for n, y in labelings.items() if (np.asarray(y) >= 0).sum() >= 2]
    out: Dict[str, Dict[str, float]] = {n: {} for n in labelings}
    if not names:
        return out
    knn = knn_accuracies(x, {n: labelings[n] for n in names}, seed=seed)
    # one distance matrix on one subsample serves every labelling's silhouette
    idx = _subsample(len(x), silhouette_max, seed)
    dist = pairwise_distances(np.asarray(x, dtype=np.float32)[idx], metric="euclidean", n_jobs=1).astype(np.float64)
    np.fill_diagonal(dist, 0.0)
    for n in names:
        y = np.asarray(labelings[n])
        valid = y >= 0
        out[n] = {
            "n": int(valid.sum()),
            "n_labels": int(len(np.unique(y[valid]))),
            "knn_acc": knn[n][0],
            "chance": knn[n][1],
            "silhouette": silhouette(x, y[idx], distances=dist),
            "ami_kmeans": kmeans_ami(x, y, seed=seed),
        }
    return out


def _within_class(x: np.ndarray, classes: np.ndarray, bins: np.ndarray, seed: int, silhouette_max: int) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    per_class: List[Dict[str, Any]] = []
    for c in np.unique(classes[(classes >= 0) & (bins >= 0)]):
        m = (classes == c) & (bins >= 0)
        s = _space_scores(x[m], {"size": bins[m]}, seed, silhouette_max)["size"]
        if s:
            per_class.append({"class": int(c), **s})
    if not per_class:
        nan = float("nan")
        return {"n": 0, "n_labels": 0, "knn_acc": nan, "chance": nan, "silhouette": nan, "ami_kmeans": nan}, []
    w = np.array([r["n"] for r in per_class], dtype=np.float64)

    def mean(key: str) -> float:
        v = np.array([r[key] for r in per_class], dtype=np.float64)
        ok = np.isfinite(v)
        return float(np.average(v[ok], weights=w[ok])) if ok.any() else float("nan")

    agg = {"n": int(w.sum()), "n_labels": int(max(r["n_labels"] for r in per_class)),
           **{key: mean(key) for key in ("knn_acc", "chance", "silhouette", "ami_kmeans")}}
    return agg, per_class


def score_space(
    x: np.ndarray,
    labels: np.ndarray,
    size_bins: np.ndarray,
    class_size_bins: Optional[np.ndarray] = None,
    *,
    seed: int = 0,
    silhouette_max: int = 5000,
) -> Tuple[Dict[str, Dict[str, float]], List[Dict[str, Any]]]:
    """Scores of one space for the labellings ``class``, ``size`` and (given ``class_size_bins``)
    ``size|class``; plus the per-class rows of the latter."""
    spaces = _space_scores(x, {"class": labels, "size": size_bins}, seed, silhouette_max)
    per_class: List[Dict[str, Any]] = []
    if class_size_bins is not None:
        spaces["size|class"], per_class = _within_class(np.asarray(x), np.asarray(labels), np.asarray(class_size_bins),
                                                        seed, silhouette_max)
    return spaces, per_class


def score_table(
    features: np.ndarray,
    embedding: Optional[np.ndarray],
    labels: np.ndarray,
    size_bins: np.ndarray,
    sizes: Optional[np.ndarray] = None,
    *,
    model: str = "model",
    n_size_bins: int = 10,
    seed: int = 0,
    silhouette_max: int = 5000,
    trust_max: int = 2000,
    n_jobs: Optional[int] = None,
    progress: bool = False,
):
    """All scores of one model as a DataFrame with :data:`SCORE_COLUMNS`, plus details.

    Args:
        features (numpy.ndarray[N, D]): the raw (pooled) features.
        embedding (numpy.ndarray[N, 2] | None): their 2-D embedding (None: features only).
        labels, size_bins (numpy.ndarray[int, N]): class and size bin per point (-1 unknown).
        sizes (numpy.ndarray[float, N] | None): object sizes, for the within-class bins.
        model: the name put in the ``model`` column.
        n_size_bins: bins per class for ``size|class``.
        seed: seeds folds, subsamples and k-means.
        silhouette_max, trust_max: subsample sizes of silhouette and trustworthiness.
        n_jobs: thread limit for BLAS/OpenMP (None: the libraries' default).
        progress: tqdm bar over the spaces.

    Returns:
        ``(table, details)``; ``details`` holds the per-class ``size|class`` rows per space.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat(np.arange(4), 50); x = rng.normal(size=(200, 8)) + 10 * np.eye(8)[y]
        >>> table, _ = score_table(x, None, y, rng.integers(0, 4, 200))
        >>> round(float(table.query("labels == 'class'").knn_acc.iloc[0]), 2)
        1.0
    """
    import pandas as pd
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n_jobs):
        return _score_table(features, embedding, labels, size_bins, sizes, model, n_size_bins, seed, silhouette_max,
                            trust_max, progress)


def _score_table(features, embedding, labels, size_bins, sizes, model, n_size_bins, seed, silhouette_max, trust_max,
                 progress):
    import pandas as pd
    from erf_lab.progress import progress as progress_bar

    features = np.asarray(features)
    n = len(features)
    for name, arr in (("labels", labels), ("size_bins", size_bins)):
        if len(arr) != n:
            raise ErfLabError(f"{name} has {len(arr)} entries for {n} feature rows")
    if embedding is not None and np.asarray(embedding).shape != (n, 2):
        raise ErfLabError(f"embedding must have shape [{n}, 2], got {list(np.asarray(embedding).shape)}")
    labels, size_bins = np.asarray(labels, np.int64), np.asarray(size_bins, np.int64)
    class_bins = None
    if sizes is not None and (labels >= 0).any() and np.isfinite(np.asarray(sizes, dtype=np.float64)).any():
        class_bins = within_class_bins(labels, sizes, n_size_bins)
    spaces = [("features", features)] + ([("embedding", np.asarray(embedding))] if embedding is not None else [])
    rows, details = [], {}
    trust = trustworthiness(features, embedding, max_samples=trust_max, seed=seed) if embedding is not None else float("nan")
    for space, x in progress_bar(spaces, desc=f"scores {model}", enabled=progress, leave=False):
        per_space, per_class = score_space(x, labels, size_bins, class_bins, seed=seed, silhouette_max=silhouette_max)
        details[space] = per_class
        for lab, s in per_space.items():
            if not s:
                continue
            rows.append({"model": model, "labels": lab, "space": space, **s,
                         "trustworthiness": trust if space == "embedding" else float("nan")})
    table = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return table, {"size|class": details, "trust_max": trust_max, "silhouette_max": silhouette_max, "k": K,
                   "n_splits": N_SPLITS}
