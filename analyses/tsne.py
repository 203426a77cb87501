"""The t-SNE analysis of one or more models: features -> PCA -> t-SNE -> scores -> report.

:func:`run_tsne` is what ``erf-lab tsne`` calls; :class:`TSNEResult` carries the embeddings,
the scores and the metadata, and saves, loads, plots and renders itself. Outputs of
``TSNEResult.save(DIR)``:

* ``DIR/index.html``: self-contained report (PNGs embedded, score tables, full metadata);
* ``DIR/scores.csv``: one row per model x labelling x space (:data:`analyses.scores.SCORE_COLUMNS`);
* ``DIR/embedding_<model>.csv``: ``index, x, y, label, class_name, size_bin, size`` per point;
* ``DIR/tsne_<model>.png``: the model's panels;
* ``DIR/report.json``: options, seed, versions, per-model metadata and the scores.

Every file is written atomically, and only after every model has been computed.
"""
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from erf_lab.errors import ErfLabError

from ._io import PathLike, dumps, safe_name, versions, write_bytes, write_text
from .report import COLORINGS, figure_png, plot_embedding, render_html

__all__ = ["ModelEmbedding", "TSNEResult", "run_tsne", "rebuild_report", "EMBEDDING_COLUMNS"]

EMBEDDING_COLUMNS = ["index", "x", "y", "label", "class_name", "size_bin", "size"]
FORMAT = "erf-lab-tsne/1"


@dataclass
class ModelEmbedding:
    """One model's 2-D embedding and what is known about each point.

    Attributes:
        name: the model's name in tables and file names.
        coords (numpy.ndarray[float64, N, 2]): t-SNE coordinates.
        labels, size_bins (numpy.ndarray[int64, N]): class and box-size bin (-1 unknown).
        sizes (numpy.ndarray[float64, N]): object size ``sqrt(w * h)`` in source pixels (NaN unknown).
        indices (numpy.ndarray[int64, N]): sample index in the data set split.
        meta: ``features`` (layer, pooling, ...), ``embedding`` (backend, perplexity, ...),
            ``model`` (path, arch), ``scores`` (per-class details), ``seconds``.
    """

    name: str
    coords: np.ndarray
    labels: np.ndarray
    size_bins: np.ndarray
    sizes: np.ndarray
    indices: np.ndarray
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def file_stem(self) -> str:
        return safe_name(self.name)


@dataclass
class TSNEResult:
    """Embeddings and scores of several models on the same samples, with the run's metadata.

    Attributes:
        models: one :class:`ModelEmbedding` per model, in the order given.
        scores (pandas.DataFrame): :data:`analyses.scores.SCORE_COLUMNS`, all models.
        class_names: label names; size_bin_edges: ``B + 1`` box-size bin edges (or None).
        color: the colourings drawn (``class``, ``size``).
        meta: ``options``, ``seed``, ``versions``, ``data``, ``split``, ``created``.
    """

    models: List[ModelEmbedding]
    scores: Any
    class_names: List[str] = field(default_factory=list)
    size_bin_edges: Optional[List[float]] = None
    color: Tuple[str, ...] = COLORINGS
    meta: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ModelEmbedding:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}; models: {', '.join(m.name for m in self.models)}")

    def summary(self) -> List[str]:
        """One line per model: kNN accuracy by class, size and size within class (features / t-SNE, chance)."""
        df = self.scores
        lines = []
        for m in self.models:
            parts = [f"{m.name}: n={len(m.coords)}"]
            for lab in ("class", "size", "size|class"):
                sel = df[(df.model == m.name) & (df.labels == lab)].set_index("space")
                if len(sel) and np.isfinite(sel.knn_acc.to_numpy(float)).any():
                    emb = sel.knn_acc.get("embedding", float("nan"))
                    parts.append(f"{lab} kNN {sel.knn_acc.get('features', float('nan')):.3f}/{emb:.3f} "
                                 f"(chance {sel.chance.iloc[0]:.3f})")
            trust = df[(df.model == m.name) & (df.space == "embedding")].trustworthiness
            if len(trust):
                parts.append(f"trustworthiness {trust.iloc[0]:.3f}")
            lines.append("  ".join(parts))
        return lines

    # ---- plotting and rendering ----
    def plot(self, model: Optional[str] = None, color: Optional[Sequence[str]] = None):
        """A matplotlib ``Figure`` of one model's panels (the first model by default)."""
        emb = self[model] if model is not None else self.models[0]
        return plot_embedding(emb, tuple(color or self.color), class_names=self.class_names,
                              size_bin_edges=self.size_bin_edges)

    def pngs(self) -> Dict[str, bytes]:
        """PNG bytes of every model's figure."""
        out = {}
        for m in self.models:
            fig = self.plot(m.name)
            out[m.name] = figure_png(fig)
        return out

    def to_html(self, pngs: Optional[Dict[str, bytes]] = None) -> str:
        """The self-contained report page."""
        return render_html(self, self.pngs() if pngs is None else pngs)

    def to_json(self) -> Dict[str, Any]:
        """Everything but the per-point arrays (those go to the embedding CSVs)."""
        return {
            "format": FORMAT,
            "meta": self.meta,
            "class_names": self.class_names,
            "size_bin_edges": self.size_bin_edges,
            "color": list(self.color),
            "models": [{"name": m.name, "embedding_csv": f"embedding_{m.file_stem}.csv", "png": f"tsne_{m.file_stem}.png",
                        "n": int(len(m.coords)), **m.meta} for m in self.models],
            "scores": self.scores.to_dict("records"),
        }

    # ---- persistence ----
    def embedding_frame(self, name: str):
        """The per-point table of one model (:data:`EMBEDDING_COLUMNS`)."""
        import pandas as pd

        m = self[name]
        names = np.array(self.class_names + ["?"], dtype=object)
        return pd.DataFrame({
            "index": m.indices, "x": m.coords[:, 0], "y": m.coords[:, 1], "label": m.labels,
            "class_name": np.where(m.labels >= 0, names[np.clip(m.labels, 0, len(self.class_names))], ""),
            "size_bin": m.size_bins, "size": m.sizes,
        }, columns=EMBEDDING_COLUMNS)

    def save(self, directory: PathLike, *, html: bool = True) -> Path:
        """Writes the report files (module docstring) into ``directory``; returns ``index.html``'s path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pngs = self.pngs()
        for m in self.models:
            write_bytes(d / f"tsne_{m.file_stem}.png", pngs[m.name])
            write_text(d / f"embedding_{m.file_stem}.csv", self.embedding_frame(m.name).to_csv(index=False))
        write_text(d / "scores.csv", self.scores.to_csv(index=False))
        write_text(d / "report.json", dumps(self.to_json()))
        index = d / "index.html"
        if html:
            write_text(index, self.to_html(pngs))
        return index

    @classmethod
    def load(cls, directory: PathLike) -> "TSNEResult":
        """Reads a directory written by :meth:`save` (``report.json`` and the embedding CSVs)."""
        import pandas as pd

        d = Path(directory)
        path = d / "report.json"
        if not path.is_file():
            raise ErfLabError(f"{d} holds no report.json: not a directory written by `erf-lab tsne`")
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ErfLabError(f"{path}: not readable JSON ({exc})") from exc
        if info.get("format") != FORMAT:
            raise ErfLabError(f"{path}: format {info.get('format')!r} is not {FORMAT!r}")
        models = []
        for entry in info["models"]:
            csv = d / entry["embedding_csv"]
            if not csv.is_file():
                raise ErfLabError(f"{csv} is missing: the report directory is incomplete")
            df = pd.read_csv(csv, keep_default_na=True)
            missing = [c for c in EMBEDDING_COLUMNS if c not in df.columns]
            if missing:
                raise ErfLabError(f"{csv}: missing columns {', '.join(missing)}")
            meta = {k: v for k, v in entry.items() if k not in ("name", "embedding_csv", "png", "n")}
            models.append(ModelEmbedding(
                name=entry["name"], coords=df[["x", "y"]].to_numpy(np.float64), labels=df["label"].to_numpy(np.int64),
                size_bins=df["size_bin"].to_numpy(np.int64), sizes=df["size"].to_numpy(np.float64),
                indices=df["index"].to_numpy(np.int64), meta=meta))
        from .scores import SCORE_COLUMNS

        scores = pd.DataFrame(info.get("scores", []), columns=SCORE_COLUMNS).astype(
            {c: float for c in ("knn_acc", "chance", "silhouette", "ami_kmeans", "trustworthiness")})
        return cls(models=models, scores=scores, class_names=list(info.get("class_names") or []),
                   size_bin_edges=info.get("size_bin_edges"), color=tuple(info.get("color") or COLORINGS),
                   meta=info.get("meta", {}))


def rebuild_report(directory: PathLike, color: Optional[Sequence[str]] = None) -> Path:
    """``erf-lab report``: re-renders the figures and ``index.html`` from saved results."""
    result = TSNEResult.load(directory)
    if color:
        result.color = _colors(color)
    return result.save(directory)


# ---- running -------------------------------------------------------------------------------------


def _colors(color: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    items = [c.strip() for c in (color.split(",") if isinstance(color, str) else color) if c.strip()]
    bad = [c for c in items if c not in COLORINGS]
    if not items or bad:
        raise ErfLabError(f"--color takes a comma-separated list of {', '.join(COLORINGS)}, got {color!r}")
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


def run_tsne(
    models: Sequence[Any],
    *,
    names: Optional[Sequence[str]] = None,
    arch: Optional[str] = None,
    trust: bool = False,
    layer: Union[None, str, Sequence[Optional[str]]] = None,
    data: Optional[str] = None,
    split: str = "test",
    image_size: Union[None, int, str, Tuple[int, int]] = None,
    pooling: str = "gap",
    max_samples: Optional[int] = None,
    color: Union[str, Sequence[str]] = COLORINGS,
    perplexity: float = 30.0,
    n_iter: int = 1000,
    pca_dim: int = 50,
    backend: str = "auto",
    batch_size: int = 64,
    device: Optional[str] = None,
    n_jobs: Optional[int] = None,
    seed: int = 0,
    out: Optional[PathLike] = None,
    save_features: bool = False,
    progress: bool = True,
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
        image_size: input side, (H, W) or ``"N[,M]"`` (default: each checkpoint's input size, else the data's).
        pooling: ``"gap"`` or ``"box"`` (see :mod:`analyses.features`).
        max_samples: stratified subsample (class x size bin), the same samples for every model.
        color: colourings drawn, ``"class,size"`` or a sequence.
        perplexity, n_iter, pca_dim, backend: t-SNE options (see :func:`analyses.embedding.embed`).
        batch_size, device: feature extraction.
        n_jobs: CPU threads for t-SNE and the scores (default: every CPU this process may use).
        seed: seeds sampling, PCA, t-SNE, folds and k-means.
        out: directory for the report files (nothing is written when None).
        save_features: also write ``features_<model>.npz`` (+ ``.json``) into ``out``.
        progress: a bar per stage on a terminal, else one line per stage (see :mod:`erf_lab._progress`).
        skip_bad: skip undecodable images of a folder or COCO data set (counted) instead of failing.

    Returns:
        :class:`TSNEResult`.

    Raises:
        ErfLabError: unreadable models, bad layers, data problems, too few samples for the perplexity.
    """
    import torch

    from erf_lab.checkpoint import LoadedModel, infer_input_channels, load_model
    from erf_lab.data import open_data
    from erf_lab.layers import expected_input_size

    from .embedding import embed, min_samples_for
    from .features import extract_features
    from .scores import score_table

    if not models:
        raise ErfLabError("give at least one model")
    colors = _colors(color)
    model_names = _model_names(models, names)
    layers = [layer] * len(models) if layer is None or isinstance(layer, str) else list(layer)
    if len(layers) == 1 and len(models) > 1:
        layers = layers * len(models)
    if len(layers) != len(models):
        raise ErfLabError(f"{len(layers)} layers for {len(models)} models: give one layer, or one per model")
    if max_samples is not None and max_samples < min_samples_for(perplexity):
        raise ErfLabError(
            f"--max-samples {max_samples} is too few for t-SNE with perplexity {perplexity:g}: it needs at least "
            f"{min_samples_for(perplexity)} samples (3 x perplexity + 2); lower --perplexity or raise --max-samples"
        )
    if isinstance(image_size, str):
        from erf_lab.jobs import parse_size

        image_size = parse_size(image_size)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if out is not None:  # before any work: an unwritable --out fails now, not after the t-SNE
        from erf_lab._io import check_output_dir

        check_output_dir(out)
    start = time.perf_counter()

    loaded: List[LoadedModel] = []
    for m in models:  # load every model first: a bad file fails before any long computation
        if isinstance(m, LoadedModel):
            loaded.append(m)
        elif isinstance(m, torch.nn.Module):
            loaded.append(LoadedModel(m.eval(), {}, "module", ""))
        else:
            loaded.append(load_model(m, arch=arch, trust=trust))
    spec = data or next((lm.meta.get("data_spec") for lm in loaded if lm.meta.get("data_spec")), None) or "digits-ms"
    datasets: Dict[Tuple[Any, int], Any] = {}

    results: List[ModelEmbedding] = []
    tables = []
    first_ds = None
    for name, lm, lay in zip(model_names, loaded, layers):
        t0 = time.perf_counter()
        channels = lm.in_channels if hasattr(lm, "in_channels") else infer_input_channels(lm.model)
        hw = tuple(image_size) if image_size else (tuple(lm.input_size[1:]) if lm.input_size else expected_input_size(lm.model))
        key = (hw, channels)
        if key not in datasets:
            datasets[key] = open_data(spec, split=split, image_size=hw, channels=channels, seed=seed, skip_bad=skip_bad)
        ds = datasets[key]
        if first_ds is None:
            first_ds = ds
        if len(ds) < min_samples_for(perplexity):
            raise ErfLabError(
                f"data {spec!r} split {split!r} has {len(ds)} samples; t-SNE with perplexity {perplexity:g} needs at "
                f"least {min_samples_for(perplexity)}: lower --perplexity"
            )
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
        tables.append(table)
        fmeta = dict(feats.meta)
        fmeta.pop("versions", None)
        fmeta["dim"] = int(feats.features.shape[1])
        model_meta = fmeta.pop("model", {})
        model_meta.update({"path": lm.path, "kind": lm.kind, "arch": lm.meta.get("arch"),
                           "arch_kwargs": lm.meta.get("arch_kwargs")})
        results.append(ModelEmbedding(
            name=name, coords=coords, labels=feats.labels, size_bins=feats.size_bins, sizes=feats.sizes,
            indices=feats.indices,
            meta={"model": model_meta, "features": fmeta, "embedding": emb_info, "scores": details,
                  "seconds": {"features": round(t1 - t0, 3), "embedding": round(t2 - t1, 3), "scores": round(t3 - t2, 3)}},
        ))
        if save_features and out is not None:
            feats.save(Path(out) / f"features_{safe_name(name)}.npz")

    import pandas as pd

    options = {"models": [str(m) if isinstance(m, (str, Path)) else type(m).__name__ for m in models],
               "names": model_names, "arch": arch, "layer": layers, "data": spec, "split": split,
               "image_size": list(image_size) if image_size else None, "pooling": pooling, "max_samples": max_samples,
               "color": list(colors), "perplexity": perplexity, "n_iter": n_iter, "pca_dim": pca_dim,
               "backend": backend, "batch_size": batch_size, "device": device, "n_jobs": n_jobs, "seed": seed}
    meta = {"options": options, "seed": seed, "data": spec, "split": split, "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - start, 3)}
    result = TSNEResult(models=results, scores=pd.concat(tables, ignore_index=True),
                        class_names=list(getattr(first_ds, "class_names", []) or []),
                        size_bin_edges=getattr(first_ds, "size_bin_edges", None), color=colors, meta=meta)
    if out is not None:
        result.save(out)
    return result
