"""figures: the paper's figures and tables, end to end (``erf-lab figures``).

One module per figure, each with one public function that writes PNG + PDF, the data behind
the figure (CSV/NPZ) and a metadata JSON, and returns a :class:`FigureResult`:

* :func:`linear_erf_theory` (``theory.py``): exact ERFs of linear stacks, sqrt-depth growth,
  the DK bilinear property;
* :func:`accuracy_table` (``accuracy.py``): accuracy, parameters, MACs, CPU latency per operator;
* :func:`erf_comparison` (``erf_comparison.py``): instance and data-set ERFs, ERF mass in the box;
* :func:`tsne_figure` (``tsne.py``): t-SNE by class and by object size, with scores;
* :func:`offsets_by_size` (``offsets.py``): learnt kernel/image offsets by object size.

:func:`run_figures` trains (or loads, or reuses) the six operator variants and makes them all,
with ``RESULTS.md`` and ``index.html``.

>>> from figures import run_figures
>>> run_figures("results", mode="quick")  # doctest: +SKIP
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "run_figures": "run",
    "FIGURES": "run",
    "FigureResult": "_io",
    "FiguresConfig": "config",
    "config_for": "config",
    "prepare_models": "config",
    "linear_erf_theory": "theory",
    "accuracy_table": "accuracy",
    "erf_comparison": "erf_comparison",
    "tsne_figure": "tsne",
    "offsets_by_size": "offsets",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'figures' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


# The function ``erf_comparison`` shares its module's name: importing the submodule (as
# ``run_figures`` does) would bind the module over it, so the function is bound eagerly here,
# after the submodule is imported.
from .erf_comparison import erf_comparison  # noqa: E402
