"""analyses: features of any layer, t-SNE by class and by box size, clustering scores, HTML reports.

The DK paper (Gao et al., ICLR 2020, section 5.3) shows t-SNE maps of MobileNetV2's last
features: CondConv groups points by class, Deformable Kernels by object size. This package
makes the same maps for any model and data set and backs them with numbers.

``import analyses`` is light: names load their modules on first use.

>>> import analyses
>>> result = analyses.run_tsne(["A.pt", "B.pt"], data="digits-ms", out="results/tsne")  # doctest: +SKIP
>>> result.scores.query("labels == 'class'")                                              # doctest: +SKIP
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "Features": "features",
    "extract_features": "features",
    "box_pool": "features",
    "resolve_layer": "features",
    "stratified_sample": "features",
    "embed": "embedding",
    "available_backends": "embedding",
    "score_table": "scores",
    "knn_accuracy": "scores",
    "silhouette": "scores",
    "kmeans_ami": "scores",
    "trustworthiness": "scores",
    "within_class_bins": "scores",
    "SCORE_COLUMNS": "scores",
    "TSNEResult": "results",
    "ModelEmbedding": "results",
    "run_tsne": "tsne",
    "rebuild_report": "tsne",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'analyses' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
