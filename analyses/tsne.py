"""The t-SNE analysis of one or more models: features -> PCA -> t-SNE -> scores -> report.

:func:`run_tsne` is what ``erf-lab tsne`` calls; :class:`analyses.results.TSNEResult` carries the embeddings,
the scores and the metadata, and saves, loads, plots and renders itself. Outputs of
``TSNEResult.save(DIR)``:

* ``DIR/index.html``: self-contained report (PNGs embedded, score tables, full metadata);
* ``DIR/scores.csv``: one row per model x labelling x space (:data:`analyses.scores.SCORE_COLUMNS`);
* ``DIR/embedding_<model>.csv``: ``index, x, y, label, class_name, size_bin, size`` per point;
* ``DIR/tsne_<model>.png``: the model's panels;
* ``DIR/report.json``: options, seed, versions, per-model metadata and the scores.

Every file is written atomically, and only after every model has been computed.
"""
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from erf_lab.errors import ErfLabError

from erf_lab.io import PathLike, safe_name, versions

from .report import COLORINGS
from .results import ModelEmbedding, TSNEResult

__all__ = ["run_tsne", "rebuild_report"]

def rebuild_report(directory: PathLike, color: Optional[Sequence[str]] = None) -> Path:
    """``erf-lab report``: re-renders the figures and ``index.html`` from saved results."""
    result = TSNEResult.load(directory)
    if color:
        result.color = _colors(color)
    return result.save(directory)


# ---- running -------------------------------------------------------------------------------------


def _colors(color: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The colourings to draw: one name of :data:`COLORINGS` or a sequence of them."""
    items = [color] if isinstance(color, str) else list(color)
    bad = [c for c in items if c not in COLORINGS]
    if not items or bad:
        raise ErfLabError(f"color (--color) takes one or more of {', '.join(COLORINGS)}, got {color!r}")
    return tuple(dict.fromkeys(items))


def _model_names(models: Sequence[Any], names: Optional[Sequence[str]]) -> List[str]:
    if names is not None:
        if len(names) != len(models):
            raise ErfLabError(f"{len(names)} names for {len(models)} models")
        base = [str(n) for n in names]
    else:
        base = [Path(m).stem if isinstance(m, (str, Path)) else f"model{i + 1}" for i, m in enumerate(models)]
    out: List[str] = []
    for b in base:
        name, k = b, 2
        while name in out:
            name, k = f"{b}-{k}", k + 1
        out.append(name)
    return out


def _load_models(models: Sequence[Any], arch: Optional[str], trust: bool) -> List[Any]:
    """Each model as a :class:`erf_lab.checkpoint.LoadedModel` (paths loaded, modules wrapped)."""
    import torch

    from erf_lab.checkpoint import LoadedModel, load_model

    loaded: List[LoadedModel] = []
    for m in models:
        if isinstance(m, LoadedModel):
            loaded.append(m)
        elif isinstance(m, torch.nn.Module):
            loaded.append(LoadedModel(m.eval(), {}, "module", ""))
        else:
            loaded.append(load_model(m, arch=arch, trust=trust))
    return loaded


def _analyse(name: str, lm: Any, ds: Any, lay: Optional[str], t0: float, *, pooling: str, max_samples: Optional[int],
             batch_size: int, device: Optional[str], seed: int, progress: bool, pca_dim: int, perplexity: float,
             n_iter: int, backend: str, n_jobs: Optional[int]):
    """One model: features, t-SNE and scores -> (its :class:`ModelEmbedding`, its score rows, the features)."""
    from .embedding import embed
    from .features import extract_features
    from .scores import score_table

    feats = extract_features(lm, ds, layer=lay, pooling=pooling, max_samples=max_samples, batch_size=batch_size,
                             device=device, seed=seed, progress=progress)
    t1 = time.perf_counter()
    coords, emb_info = embed(feats.features, pca_dim=pca_dim, perplexity=perplexity, n_iter=n_iter, backend=backend,
                             seed=seed, n_jobs=n_jobs, progress=progress)
    t2 = time.perf_counter()
    table, details = score_table(feats.features, coords, feats.labels, feats.size_bins, feats.sizes, model=name,
                                 n_size_bins=max(2, len(feats.size_bin_edges or []) - 1), seed=seed,
                                 n_jobs=n_jobs, progress=progress)
    t3 = time.perf_counter()
    fmeta = dict(feats.meta)
    fmeta.pop("versions", None)
    fmeta["dim"] = int(feats.features.shape[1])
    model_meta = fmeta.pop("model", {})
    model_meta.update({"path": lm.path, "kind": lm.kind, "arch": lm.meta.get("arch"),
                       "arch_kwargs": lm.meta.get("arch_kwargs")})
    return ModelEmbedding(
        name=name, coords=coords, labels=feats.labels, size_bins=feats.size_bins, sizes=feats.sizes,
        indices=feats.indices,
        meta={"model": model_meta, "features": fmeta, "embedding": emb_info, "scores": details,
              "seconds": {"features": round(t1 - t0, 3), "embedding": round(t2 - t1, 3), "scores": round(t3 - t2, 3)}},
    ), table, feats


def _layers_for(layer: Union[None, str, Sequence[Optional[str]]], n_models: int) -> List[Optional[str]]:
    """One layer per model: the same one for all, or one each."""
    layers = [layer] * n_models if layer is None or isinstance(layer, str) else list(layer)
    if len(layers) == 1 and n_models > 1:
        layers = layers * n_models
    if len(layers) != n_models:
        raise ErfLabError(f"{len(layers)} layers for {n_models} models: give one layer, or one per model")
    return layers


def _data_for(lm: Any, image_size: Optional[Tuple[int, int]], spec: str, split: str, seed: int, skip_bad: bool,
              cache: Dict[Tuple[Any, int], Any]) -> Any:
    """The data set at the model's input size and channels (opened once per size and channel count)."""
    from erf_lab.checkpoint import infer_input_channels
    from erf_lab.data import open_data
    from erf_lab.layers import expected_input_size

    channels = lm.in_channels if hasattr(lm, "in_channels") else infer_input_channels(lm.model)
    hw = tuple(image_size) if image_size else (tuple(lm.input_size[1:]) if lm.input_size else expected_input_size(lm.model))
    key = (hw, channels)
    if key not in cache:
        cache[key] = open_data(spec, split=split, image_size=hw, channels=channels, seed=seed, skip_bad=skip_bad)
    return cache[key]


def _run_meta(options: Dict[str, Any], seed: int, spec: str, split: str, start: float) -> Dict[str, Any]:
    return {"options": options, "seed": seed, "data": spec, "split": split,
            "versions": versions("scikit-learn", "openTSNE"),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - start, 3)}


def run_tsne(
    models: Sequence[Any], *, names: Optional[Sequence[str]] = None, arch: Optional[str] = None, trust: bool = False,
    layer: Union[None, str, Sequence[Optional[str]]] = None, data: Optional[str] = None, split: str = "test",
    image_size: Union[None, int, Tuple[int, int]] = None, pooling: str = "gap", max_samples: Optional[int] = None,
    color: Union[str, Sequence[str]] = COLORINGS, perplexity: float = 30.0, n_iter: int = 1000, pca_dim: int = 50,
    backend: str = "auto", batch_size: int = 64, device: Optional[str] = None, n_jobs: Optional[int] = None,
    seed: int = 0, out: Optional[PathLike] = None, save_features: bool = False, progress: bool = True,
    skip_bad: bool = False,
) -> TSNEResult:
    """Features, t-SNE and scores of each model on the same samples; saved to ``out`` when given.

    Args:
        models: checkpoint paths (anything :func:`erf_lab.load_model` reads), ``nn.Module``\\ s or
            :class:`erf_lab.LoadedModel`\\ s.
        names: display names (default: file stems, ``model1``... for modules).
        arch, trust: passed to :func:`erf_lab.load_model` for paths.
        layer: one layer name for every model, one per model, or None (last convolutional stage).
        data: ``--data`` spec (default: the first checkpoint's data spec, else ``digits-ms``).
        split: data split.
        image_size: input side or (H, W) (default: each checkpoint's input size, else the data's).
        pooling: ``"gap"`` or ``"box"`` (see :mod:`analyses.features`).
        max_samples: stratified subsample (class x size bin), the same samples for every model.
        color: colourings drawn, ``"class,size"`` or a sequence.
        perplexity, n_iter, pca_dim, backend: t-SNE options (see :func:`analyses.embedding.embed`).
        batch_size, device: feature extraction.
        n_jobs: CPU threads for t-SNE and the scores (default: every CPU this process may use).
        seed: seeds sampling, PCA, t-SNE, folds and k-means.
        out: directory for the report files (nothing is written when None).
        save_features: also write ``features_<model>.npz`` (+ ``.json``) into ``out``.
        progress: a bar per stage on a terminal, else one line per stage (see :mod:`erf_lab.progress`).
        skip_bad: skip undecodable images of a folder or COCO data set (counted) instead of failing.

    Returns:
        :class:`TSNEResult`.

    Raises:
        ErfLabError: unreadable models, bad layers, data problems, too few samples for the perplexity.
    """
    from .embedding import min_samples_for

    if not models:
        raise ErfLabError("give at least one model")
    colors = _colors(color)
    model_names = _model_names(models, names)
    layers = _layers_for(layer, len(models))
    if max_samples is not None and max_samples < min_samples_for(perplexity):
        raise ErfLabError(
            f"max_samples={max_samples} (--max-samples) is too few for t-SNE with perplexity {perplexity:g}: it needs "
            f"at least {min_samples_for(perplexity)} samples (3 x perplexity + 2); lower perplexity or raise max_samples"
        )
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if out is not None:  # before any work: an unwritable --out fails now, not after the t-SNE
        from erf_lab.io import check_output_dir

        check_output_dir(out)
    start = time.perf_counter()

    loaded = _load_models(models, arch, trust)  # every model first: a bad file fails before any long work
    spec = data or next((lm.meta.get("data_spec") for lm in loaded if lm.meta.get("data_spec")), None) or "digits-ms"
    datasets: Dict[Tuple[Any, int], Any] = {}

    results: List[ModelEmbedding] = []
    tables = []
    first_ds = None
    for name, lm, lay in zip(model_names, loaded, layers):
        t0 = time.perf_counter()
        ds = _data_for(lm, image_size, spec, split, seed, skip_bad, datasets)
        if first_ds is None:
            first_ds = ds
        if len(ds) < min_samples_for(perplexity):
            raise ErfLabError(
                f"data {spec!r} split {split!r} has {len(ds)} samples; t-SNE with perplexity {perplexity:g} needs at "
                f"least {min_samples_for(perplexity)}: lower perplexity (--perplexity)"
            )
        emb, table, feats = _analyse(name, lm, ds, lay, t0, pooling=pooling, max_samples=max_samples,
                                     batch_size=batch_size, device=device, seed=seed, progress=progress,
                                     pca_dim=pca_dim, perplexity=perplexity, n_iter=n_iter, backend=backend,
                                     n_jobs=n_jobs)
        results.append(emb)
        tables.append(table)
        if save_features and out is not None:
            feats.save(Path(out) / f"features_{safe_name(name)}.npz")

    import pandas as pd

    options = {"models": [str(m) if isinstance(m, (str, Path)) else type(m).__name__ for m in models],
               "names": model_names, "arch": arch, "layer": layers, "data": spec, "split": split,
               "image_size": list(image_size) if image_size else None, "pooling": pooling, "max_samples": max_samples,
               "color": list(colors), "perplexity": perplexity, "n_iter": n_iter, "pca_dim": pca_dim,
               "backend": backend, "batch_size": batch_size, "device": device, "n_jobs": n_jobs, "seed": seed}
    meta = _run_meta(options, seed, spec, split, start)
    result = TSNEResult(models=results, scores=pd.concat(tables, ignore_index=True),
                        class_names=list(getattr(first_ds, "class_names", []) or []),
                        size_bin_edges=getattr(first_ds, "size_bin_edges", None), color=colors, meta=meta)
    if out is not None:
        result.save(out)
    return result
