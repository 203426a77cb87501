"""2-D embedding of features: PCA to 50 dimensions, then t-SNE (van der Maaten & Hinton, 2008).

Two t-SNE backends give the same kind of map (Barnes-Hut or FFT-accelerated gradients,
PCA initialisation, learning rate ``n / early_exaggeration``):

* ``"sklearn"``: :class:`sklearn.manifold.TSNE` (Barnes-Hut), always available;
* ``"opentsne"``: openTSNE, with FFT-interpolated gradients (Linderman et al., 2019) from
  10,000 points (Barnes-Hut below, openTSNE's own rule), much faster for large sets; install
  with ``pip install erf-lab[tsne]``.

``backend="auto"`` uses openTSNE when it is importable.
"""
import os
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from erf_lab.errors import ErfLabError

__all__ = ["embed", "pca_reduce", "tsne", "available_backends", "min_samples_for", "BACKENDS", "MIN_ITER"]

BACKENDS = ("auto", "sklearn", "opentsne")
#: t-SNE iterations include 250 of early exaggeration (both backends' default), so fewer make no map.
MIN_ITER = 250
EARLY_EXAGGERATION_ITER = 250
#: openTSNE's own rule: FFT-interpolated gradients from 10,000 points, Barnes-Hut below (faster there).
FFT_MIN_SAMPLES = 10_000


def available_backends() -> Tuple[str, ...]:
    """The t-SNE backends importable here (``sklearn`` always)."""
    try:
        import openTSNE  # noqa: F401

        return ("opentsne", "sklearn")
    except ImportError:
        return ("sklearn",)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def min_samples_for(perplexity: float) -> int:
    """Fewest samples t-SNE accepts at ``perplexity``: each point needs 3 x perplexity neighbours."""
    return int(np.floor(3 * perplexity)) + 2


def pca_reduce(x: np.ndarray, dim: int = 50, seed: int = 0) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The first ``dim`` principal components of ``x`` (unchanged, only centred, when it has at most
    ``dim`` columns) and a summary (``dim``, ``explained_variance``)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float32)
    dim = int(min(dim, x.shape[0], x.shape[1]))
    if x.shape[1] <= dim:
        return x - x.mean(0), {"dim": int(x.shape[1]), "explained_variance": 1.0, "applied": False}
    pca = PCA(n_components=dim, random_state=seed, svd_solver="randomized" if dim < 0.8 * min(x.shape) else "full")
    y = pca.fit_transform(x)
    return y.astype(np.float32), {"dim": dim, "explained_variance": float(pca.explained_variance_ratio_.sum()), "applied": True}


def _check(n: int, perplexity: float, n_iter: int) -> None:
    if perplexity <= 0:
        raise ErfLabError(f"perplexity must be > 0, got {perplexity}")
    if n < min_samples_for(perplexity):
        raise ErfLabError(
            f"t-SNE with perplexity {perplexity:g} needs at least {min_samples_for(perplexity)} samples "
            f"(3 x perplexity + 2), got {n}: lower perplexity (--perplexity) or use more samples"
        )
    if n_iter < MIN_ITER:
        raise ErfLabError(f"t-SNE needs at least {MIN_ITER} iterations (the early-exaggeration phase), got {n_iter}")


def tsne(
    x: np.ndarray,
    *,
    perplexity: float = 30.0,
    n_iter: int = 1000,
    backend: str = "auto",
    seed: int = 0,
    n_jobs: Optional[int] = None,
    progress: bool = True,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """t-SNE of ``x`` (N, D) to (N, 2), float64, and what was run (backend, parameters, seconds)."""
    if backend not in BACKENDS:
        raise ErfLabError(f"t-SNE backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    _check(len(x), perplexity, n_iter)
    n_jobs = int(n_jobs or _cpu_count())
    if backend == "auto":
        backend = available_backends()[0]
    start = time.perf_counter()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n_jobs):
        y, gradient, version = _run(x, backend, perplexity, n_iter, seed, n_jobs, progress)
    info = {"backend": backend, "backend_version": version, "gradient": gradient, "perplexity": float(perplexity),
            "n_iter": int(n_iter), "early_exaggeration_iter": min(EARLY_EXAGGERATION_ITER, n_iter), "init": "pca",
            "seed": seed, "n_jobs": n_jobs, "seconds": round(time.perf_counter() - start, 3)}
    if not np.isfinite(y).all():
        raise ErfLabError(f"t-SNE ({backend}) produced non-finite coordinates; check the features for duplicates or NaN")
    return y, info


def _run(x: np.ndarray, backend: str, perplexity: float, n_iter: int, seed: int, n_jobs: int,
         progress: bool) -> Tuple[np.ndarray, str, str]:
    if backend == "opentsne":
        try:
            import openTSNE
        except ImportError:
            raise ErfLabError("t-SNE backend 'opentsne' needs openTSNE: pip install 'erf-lab[tsne]' (or openTSNE)") from None
        from erf_lab.progress import progress as progress_bar

        bar = progress_bar(total=n_iter, desc="t-SNE (openTSNE)", unit="iter", enabled=progress, leave=False)
        every = 50

        def tick(iteration, error, embedding):  # openTSNE callback: False = keep going
            bar.update(min(every, bar.total - bar.n))
            return False

        ee = min(EARLY_EXAGGERATION_ITER, n_iter)
        gradient = "fft" if len(x) >= FFT_MIN_SAMPLES else "bh"
        model = openTSNE.TSNE(
            n_components=2, perplexity=perplexity, early_exaggeration_iter=ee, n_iter=n_iter - ee,
            initialization="pca", negative_gradient_method=gradient, n_jobs=n_jobs, random_state=seed,
            callbacks=tick if progress else None, callbacks_every_iters=every, verbose=False,
        )
        try:
            y = np.asarray(model.fit(x), dtype=np.float64)
            bar.update(bar.total - bar.n)  # callbacks come every 50 iterations: count the remainder
        finally:
            bar.close()
        version = openTSNE.__version__
    else:
        gradient = "bh"
        import sklearn
        from sklearn.manifold import TSNE
        from erf_lab.progress import progress as progress_bar

        with progress_bar(total=1, desc="t-SNE (scikit-learn)", unit="run", enabled=progress, leave=False) as bar:
            y = TSNE(n_components=2, perplexity=perplexity, max_iter=n_iter, init="pca", learning_rate="auto",
                     random_state=seed, n_jobs=n_jobs).fit_transform(x).astype(np.float64)
            bar.update()
        version = sklearn.__version__
    return y, gradient, version


def embed(
    features: np.ndarray,
    *,
    pca_dim: int = 50,
    perplexity: float = 30.0,
    n_iter: int = 1000,
    backend: str = "auto",
    seed: int = 0,
    n_jobs: Optional[int] = None,
    progress: bool = True,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """PCA to ``pca_dim`` dimensions, then t-SNE to 2-D.

    Args:
        features (numpy.ndarray[N, D]): one row per sample.
        pca_dim: principal components kept before t-SNE (all when D is smaller).
        perplexity: t-SNE perplexity; needs ``N >= 3 * perplexity + 2``.
        n_iter: total t-SNE iterations, the first 250 with early exaggeration.
        backend: ``"auto"`` (openTSNE when installed), ``"sklearn"`` or ``"opentsne"``.
        seed: seeds PCA and t-SNE.
        n_jobs: threads (default: the CPUs this process may use).
        progress: a bar on a terminal, else one line when done (see :mod:`erf_lab.progress`).

    Returns:
        ``(coords, info)``: ``coords`` (numpy.ndarray[float64, N, 2]) and ``info`` (what ran,
        PCA explained variance, seconds).

    Raises:
        ErfLabError: too few samples for the perplexity, too few iterations, unknown or
            missing backend.

    Example::

        >>> x = np.random.default_rng(0).normal(size=(200, 64))
        >>> coords, info = embed(x, perplexity=10, n_iter=250, backend="sklearn", progress=False)
        >>> coords.shape
        (200, 2)
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ErfLabError(f"features must be a 2-D array (samples x dimensions), got shape {list(features.shape)}")
    _check(len(features), perplexity, n_iter)
    start = time.perf_counter()
    reduced, pca_info = pca_reduce(features, pca_dim, seed)
    pca_info["seconds"] = round(time.perf_counter() - start, 3)
    coords, info = tsne(reduced, perplexity=perplexity, n_iter=n_iter, backend=backend, seed=seed, n_jobs=n_jobs,
                        progress=progress)
    info["pca"] = pca_info
    return coords, info
