"""The result of a comparison: :class:`ComparisonResult`, a grid of ERFs (rows: models, columns:
layers x image sizes) with its metric table, and the files it saves and loads
(``compare.{csv,npz,json,png}``, ``growth.png``, ``index.html``)."""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..erf.result import ERFResult
from ..errors import ErfLabError
from ..io import write_bytes, write_csv, write_json, write_npz, write_text

__all__ = ["ComparisonResult", "FILES", "SIZE_METRICS"]

FILES = ("compare.csv", "compare.npz", "compare.json", "compare.png", "growth.png", "index.html")

#: The ERF size metrics of the growth curve (columns of :attr:`ComparisonResult.table`).
SIZE_METRICS = ("luo_size", "sigma", "radius_mass@0.5", "radius_mass@0.9", "area_ratio_replknet@0.2",
                "area_ratio_replknet@0.5", "erf_trf_ratio")


def _scalars(metrics: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sy, sx = out.get("sigma_y", math.nan), out.get("sigma_x", math.nan)
    out["sigma"] = math.sqrt(sy * sx) if sy == sy and sx == sx and sy >= 0 and sx >= 0 else math.nan
    return out


@dataclass
class ComparisonResult:
    """ERFs of several models, layers and image sizes on the same images.

    Attributes:
        models: one dict per row (``name``, ``spec``, ``path``, ``kind``, ``arch``, ``epoch``,
            ``untrained``, ``layers``: its layer name per layer column).
        columns: one dict per column (``label``, ``slot``: index into the layer columns,
            ``layer``: the name asked for or ``stage K``, ``image_size`` [H, W]).
        cells: (row, column) -> :class:`~erf_lab.erf.ERFResult`; a failed job has no cell.
        depth: (row, column) -> spatial depth of the layer (:func:`erf_lab.layers.spatial_depth`).
        failures: ``{"model", "image_size", "error"}`` per failed (model, size) job.
        meta: the options (preset, data, seed, number of images, axis, versions, seconds...).
    """

    models: List[Dict[str, Any]]
    columns: List[Dict[str, Any]]
    cells: Dict[Tuple[int, int], ERFResult] = field(default_factory=dict)
    depth: Dict[Tuple[int, int], int] = field(default_factory=dict)
    failures: List[Dict[str, Any]] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def axis(self) -> str:
        """The growth curve's x axis: ``"epoch"`` for a training trajectory, else ``"depth"``."""
        return self.meta.get("axis", "depth")

    def table(self):
        """One row per model x column (a failed job too, with its ``error``): the model, epoch,
        layer, image size, depth, images, theoretical RF and every scalar ERF metric."""
        import pandas as pd

        failed = {(f["model"], tuple(f["image_size"])): f["error"] for f in self.failures}
        rows = []
        for i, m in enumerate(self.models):
            for j, c in enumerate(self.columns):
                r = self.cells.get((i, j))
                row: Dict[str, Any] = {
                    "model": m["name"], "epoch": m.get("epoch"), "column": c["label"],
                    "layer": m["layers"][c["slot"]] if m.get("layers") else c["layer"],
                    "image_h": c["image_size"][0], "image_w": c["image_size"][1], "depth": self.depth.get((i, j)),
                    "n_images": None if r is None else r.n_images, "n_skipped": None if r is None else r.n_skipped,
                    "error": failed.get((m["name"], tuple(c["image_size"])), "") if r is None else ""}
                if r is not None:
                    rf = r.meta.get("rf_size")
                    row["trf_y"], row["trf_x"] = (rf[0], rf[1]) if rf else (None, None)
                    row.update(_scalars(r.metrics()))
                rows.append(row)
        return pd.DataFrame(rows)

    # ---- files ---------------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        """What ``compare.json`` holds: models, columns, depths, failures, each map's meta (and its
        key in ``compare.npz``), the options."""
        cells = {f"{i},{j}": {"key": f"r{i}_c{j}", "n_images": r.n_images, "n_skipped": r.n_skipped, "meta": r.meta}
                 for (i, j), r in self.cells.items()}
        return {"format": "erf-lab-compare", "version": 1, "models": self.models, "columns": self.columns,
                "depth": {f"{i},{j}": d for (i, j), d in self.depth.items()}, "failures": self.failures,
                "cells": cells, "meta": self.meta}

    def save(self, directory: Union[str, Path], *, plots: bool = True) -> Path:
        """Writes :data:`FILES` into ``directory``, each atomically (``plots=False``: no PNG or HTML)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        table = self.table()
        write_npz(d / "compare.npz", **{f"r{i}_c{j}": r.map for (i, j), r in self.cells.items()})
        write_csv(d / "compare.csv", table)
        write_json(d / "compare.json", self.to_json())
        if plots:
            from .plots import growth_figure, grid_figure
            from .report import render_html
            from ..html import figure_png

            pngs = {"compare.png": figure_png(grid_figure(self), dpi=110),
                    "growth.png": figure_png(growth_figure(self), dpi=110)}
            for name, png in pngs.items():
                write_bytes(d / name, png)
            write_text(d / "index.html", render_html(self, table, pngs))
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "ComparisonResult":
        """Reads a comparison saved by :meth:`save` (``compare.json`` and ``compare.npz``)."""
        d = Path(directory)
        try:
            doc = json.loads((d / "compare.json").read_text())
            with np.load(d / "compare.npz") as z:
                maps = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
            if doc.get("format") != "erf-lab-compare":
                raise ValueError("not an erf-lab comparison")
            cells = {}
            for key, c in doc["cells"].items():
                i, j = (int(v) for v in key.split(","))
                cells[(i, j)] = ERFResult(maps[c["key"]], int(c["n_images"]), int(c["n_skipped"]), c["meta"])
        except (OSError, KeyError, ValueError) as exc:
            raise ErfLabError(f"{d} does not hold a saved comparison (compare.json + compare.npz): {exc}") from exc
        depth = {tuple(int(v) for v in k.split(",")): d_ for k, d_ in doc.get("depth", {}).items()}
        return cls(doc["models"], doc["columns"], cells, depth, doc.get("failures", []), doc.get("meta", {}))

    def plot(self, kind: str = "grid"):
        """The ``"grid"`` (compare.png) or ``"growth"`` (growth.png) figure (a matplotlib Figure)."""
        from .plots import growth_figure, grid_figure

        if kind not in ("grid", "growth"):
            raise ErfLabError(f"kind must be 'grid' or 'growth', got {kind!r}")
        return grid_figure(self) if kind == "grid" else growth_figure(self)

    def summary(self) -> str:
        """A short text table: model, column, Luo size, sigma, radii of 50/90% mass (or the error)."""
        t = self.table()
        wm = max([5] + [len(str(v)) for v in t["model"]])
        wc = max([6] + [len(str(v)) for v in t["column"]])
        lines = [f"{'model':<{wm}}  {'column':<{wc}} {'luo_size':>9} {'sigma':>8} {'r50':>7} {'r90':>7}"]
        for _, row in t.iterrows():
            head = f"{str(row['model']):<{wm}}  {str(row['column']):<{wc}}"
            if row["error"]:
                lines.append(f"{head} failed: {row['error']}")
                continue
            lines.append(f"{head} {row['luo_size']:>9.2f} {row['sigma']:>8.2f} {row['radius_mass@0.5']:>7.1f} "
                         f"{row['radius_mass@0.9']:>7.1f}")
        return "\n".join(lines)

    def result(self, model: Union[int, str], column: Union[int, str]) -> Optional[ERFResult]:
        """The :class:`~erf_lab.erf.ERFResult` of a model (index or name) and a column (index or label)."""
        i = model if isinstance(model, int) else [m["name"] for m in self.models].index(model)
        j = column if isinstance(column, int) else [c["label"] for c in self.columns].index(column)
        return self.cells.get((i, j))
