"""PCA + t-SNE embedding: structure kept, seeds, backends, bad inputs."""
import sys

import numpy as np
import pytest

from analyses.embedding import available_backends, embed, min_samples_for, pca_reduce
from analyses.scores import knn_accuracy
from erf_lab.errors import ErfLabError

try:
    import openTSNE  # noqa: F401

    HAS_OPENTSNE = True
except ImportError:
    HAS_OPENTSNE = False


def _blobs(n=180, d=80, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return rng.normal(size=(k, d))[y] * 6 + rng.normal(size=(n, d)), y


def test_sklearn_embedding_keeps_clusters_and_is_seeded():
    x, y = _blobs()
    a, info = embed(x, perplexity=10, n_iter=250, backend="sklearn", seed=3, n_jobs=1, progress=False)
    assert a.shape == (180, 2) and np.isfinite(a).all()
    assert knn_accuracy(a, y)[0] > 0.95
    assert info["backend"] == "sklearn" and info["pca"]["dim"] == 50 and info["pca"]["applied"]
    b, _ = embed(x, perplexity=10, n_iter=250, backend="sklearn", seed=3, n_jobs=1, progress=False)
    np.testing.assert_array_equal(a, b)


def test_opentsne_embedding_keeps_clusters_and_is_seeded():
    assert HAS_OPENTSNE, "openTSNE is needed (the test extra installs it)"
    x, y = _blobs()
    a, info = embed(x, perplexity=10, n_iter=250, backend="opentsne", seed=3, n_jobs=1, progress=False)
    assert info["backend"] == "opentsne" and info["gradient"] == "bh"  # FFT from 10,000 points
    assert knn_accuracy(a, y)[0] > 0.95
    b, _ = embed(x, perplexity=10, n_iter=250, backend="opentsne", seed=3, n_jobs=1, progress=False)
    np.testing.assert_allclose(a, b)
    assert embed(x, perplexity=10, n_iter=250, backend="auto", n_jobs=1, progress=False)[1]["backend"] == "opentsne"


def test_auto_backend_without_opentsne_uses_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "openTSNE", None)  # import fails as if not installed
    assert available_backends() == ("sklearn",)
    x, _ = _blobs(n=60, d=10)
    _, info = embed(x, perplexity=5, n_iter=250, n_jobs=1, progress=False)
    assert info["backend"] == "sklearn" and info["pca"]["applied"] is False  # 10 dims: no PCA needed
    with pytest.raises(ErfLabError, match=r"needs openTSNE: pip install 'erf-lab\[tsne\]'"):
        embed(x, perplexity=5, n_iter=250, backend="opentsne", progress=False)


def test_too_few_samples_for_the_perplexity_is_one_clear_line():
    x, _ = _blobs(n=40, d=8)
    assert min_samples_for(30) == 92
    with pytest.raises(ErfLabError) as exc:
        embed(x, perplexity=30, n_iter=250, backend="sklearn", progress=False)
    msg = str(exc.value)
    assert "perplexity 30 needs at least 92 samples" in msg and "got 40" in msg and "\n" not in msg


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_iter=100), "at least 250 iterations"),
    (dict(perplexity=-1.0), "perplexity must be > 0"),
    (dict(backend="umap"), "backend must be one of auto, sklearn, opentsne"),
])
def test_bad_options_are_refused(kwargs, match):
    x, _ = _blobs(n=60, d=8)
    with pytest.raises(ErfLabError, match=match):
        embed(x, **{"perplexity": 5, **kwargs}, progress=False)


def test_pca_keeps_the_leading_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 120)) + 1e-3 * rng.normal(size=(300, 120))
    y, info = pca_reduce(x, 50)
    assert y.shape == (300, 50) and info["explained_variance"] > 0.999
