"""The result of an ERF computation: :class:`ERFResult`, the aggregated float64 map with every
option that made it, its metrics, display transforms, plots and the ``erf.npz`` + ``erf.json``
files it saves and loads."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import ErfLabError
from ..io import atomic_write, dumps, write_text
from ..metrics import erf_metrics, replknet_transform
from .options import UNSET

__all__ = ["ERFResult"]


@dataclass
class ERFResult:
    """An aggregated ERF map with its metadata.

    Attributes:
        map (numpy.ndarray[float64, H, W]): mean over images of the per-image maps, before
            any display transform.
        n_images: images that contributed; n_skipped: images whose map was not finite.
        meta: every option (preset, layer, unit, RF centre/box, seed, sizes, versions...).
        image: the input image (H x W x C in [0, 1]) for an instance ERF, else None.
    """

    map: np.ndarray
    n_images: int
    n_skipped: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)
    image: Optional[np.ndarray] = None

    @property
    def center(self) -> Tuple[float, float]:
        """The unit's theoretical-RF centre (pixels), or the array centre when asked for parity."""
        c = self.meta.get("rf_center")
        if c is None or self.meta.get("center_mode") == "array":
            h, w = self.map.shape
            return float(h // 2), float(w // 2)
        return float(c[0]), float(c[1])

    def display(self, normalize: Optional[str] = UNSET) -> np.ndarray:
        """The map after the preset's display transform (or ``normalize``)."""
        norm = self.meta.get("options", {}).get("normalize") if normalize is UNSET else normalize
        m = self.map
        if norm == "log_max":
            return replknet_transform(np.clip(m, 0, None))
        if norm == "max":
            mx = np.abs(m).max()
            return m / mx if mx > 0 else m
        if norm == "sum":
            s = m.sum()
            return m / s if s != 0 else m
        return m

    def metrics(self) -> Dict[str, Any]:
        """Every metric of :func:`erf_lab.metrics.erf_metrics`, centred on the unit's RF centre.

        Computed once per map and centre (``save`` and the CLI's summary line share them); the
        returned dict is a copy."""
        rf = self.meta.get("rf_size")
        rf = tuple(rf) if rf is not None and None not in rf else None
        key = (id(self.map), self.map.shape, self.center, rf)
        cached = self.__dict__.get("_metrics")
        if cached is None or cached[0] != key:
            cached = (key, erf_metrics(self.map, self.center, rf, array_center_parity=True))
            self.__dict__["_metrics"] = cached
        return dict(cached[1])

    def save(self, directory: Union[str, Path], *, plot: bool = True) -> Path:
        """Writes ``erf.npz`` (``erf``: the float64 map), ``erf.json`` (metrics, meta) and ``erf.png``
        (plus ``erf_overlay.png`` for an instance ERF), each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"erf": self.map}
        if self.image is not None:
            arrays["image"] = self.image
        payload = {"metrics": self.metrics(), "meta": dict(self.meta, n_images=self.n_images, n_skipped=self.n_skipped)}
        text = dumps(payload)
        if plot:
            from ..heatmap import save_erf_figure

            save_erf_figure(self, d / "erf.png")
            if self.image is not None:
                save_erf_figure(self, d / "erf_overlay.png", overlay=True)

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # uncompressed: maps are read back often and are small

        atomic_write(d / "erf.npz", write_npz)
        write_text(d / "erf.json", text + "\n")
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "ERFResult":
        d = Path(directory)
        try:
            with np.load(d / "erf.npz") as z:
                m = np.asarray(z["erf"], dtype=np.float64)
                image = np.asarray(z["image"]) if "image" in z.files else None
            meta = json.loads((d / "erf.json").read_text())["meta"]
        except (OSError, KeyError, ValueError) as exc:
            raise ErfLabError(f"{d} does not hold a saved ERF (erf.npz + erf.json): {exc}") from exc
        return cls(m, int(meta.pop("n_images")), int(meta.pop("n_skipped")), meta, image)

    def plot(self, ax=None, **kwargs):
        """Heatmap with colour bar, RF centre marked, theoretical RF outlined (see :mod:`erf_lab.heatmap`)."""
        from ..heatmap import plot_erf

        return plot_erf(self, ax=ax, **kwargs)
