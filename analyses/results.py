"""The results of a t-SNE run: :class:`ModelEmbedding` per model and :class:`TSNEResult`, which
carries the embeddings, the scores and the metadata, and saves, loads, plots and renders itself
(the file layout is in :mod:`analyses.tsne`)."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from erf_lab.errors import ErfLabError
from erf_lab.io import PathLike, dumps, safe_name, write_bytes, write_text

from .report import COLORINGS, figure_png, plot_embedding, render_html

__all__ = ["ModelEmbedding", "TSNEResult", "EMBEDDING_COLUMNS", "FORMAT"]

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
