"""ERF comparisons (``erf-lab compare``, :func:`erf_lab.compare`): ERFs of several models, layers
and image sizes on the same images, on one colour scale per column, with growth curves against depth or training epoch.

* :mod:`.models` -- the models: files, globs of epoch checkpoints, ``untrained:SPEC``;
* :mod:`.run` -- :func:`compare`: checks every input, then one pass per (model, size) over all layers;
* :mod:`.result` -- :class:`ComparisonResult`: the grid, its metric table, save and load;
* :mod:`.plots` -- ``compare.png`` and ``growth.png``; :mod:`.report` -- ``index.html``.
"""
from .models import ModelEntry, resolve_models
from .result import FILES, SIZE_METRICS, ComparisonResult
from .run import STAGES, compare

__all__ = ["compare", "ComparisonResult", "ModelEntry", "resolve_models", "FILES", "SIZE_METRICS", "STAGES"]
