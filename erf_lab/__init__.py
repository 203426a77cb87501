"""erf_lab: effective receptive fields (ERF) of vision models, theoretical receptive fields,
ERF metrics and heatmaps, safe checkpoint loading, data sets and study-model training.

``import erf_lab`` is light: the public names below load their modules on first use, and
matplotlib is imported only when something is plotted.

>>> import torch, erf_lab
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
>>> erf_lab.compute_erf(net, torch.randn(8, 3, 32, 32), progress=False).map.shape
(32, 32)
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compute_erf": "erf",
    "compute_erfs": "erf",
    "ERFResult": "erf",
    "ERFOptions": "erf",
    "PRESETS": "erf",
    "instance_erf": "erf",
    "compute_layer_erfs": "erf",
    "compare": "comparison",
    "ComparisonResult": "comparison",
    "theoretical_rf": "rf",
    "load_model": "checkpoint",
    "LoadedModel": "checkpoint",
    "ErfLabError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'erf_lab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
