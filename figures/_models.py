"""Helpers shared by the figures that analyse trained models: loading, test data, layers, geometry."""
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError

from ._io import PathLike


def load_models(checkpoints: Mapping[str, PathLike], device: str = "cpu") -> Dict[str, Any]:
    """``{op: LoadedModel}`` in eval mode on ``device``."""
    from erf_lab import load_model

    out = {}
    for op, path in checkpoints.items():
        lm = load_model(str(path))
        lm.model.to(device).eval()
        out[op] = lm
    if not out:
        raise ErfLabError("no models to analyse")
    return out


def open_test_data(loaded: Mapping[str, Any], data: Optional[str], split: str = "test"):
    """The data set the models were trained on (or ``data``), at the models' input size."""
    from erf_lab.data import open_data

    first = next(iter(loaded.values()))
    spec = data or first.meta.get("data_spec") or "digits-ms"
    size = first.input_size
    return open_data(spec, split=split, image_size=None if size is None else tuple(size[1:]),
                     channels=3 if size is None else size[0])


def display_image(ds: Any, image: torch.Tensor) -> np.ndarray:
    """A normalised (C, H, W) image back to H x W x C in [0, 1]."""
    mean = torch.tensor(ds.mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.tensor(ds.std, dtype=image.dtype).view(-1, 1, 1)
    img = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def last_spatial_layer(model: nn.Module, input_size: Tuple[int, int, int]) -> str:
    """The default layer of ``model`` (:func:`erf_lab.layers.default_layer`, the rule of ``erf-lab erf``)."""
    from erf_lab.layers import default_layer

    p = next(model.parameters())
    chosen = default_layer(model, torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    if chosen.name is None:
        raise ErfLabError("the model's output is its spatial map; pass layer=")
    return chosen.name


def grid_geometry(model: nn.Module, layer: str, input_size: Tuple[int, int, int]) -> Dict[str, Any]:
    """``{"grid": (H', W'), "stride": (sy, sx), "center0": (cy0, cx0), "source": str}`` of ``layer``'s map."""
    from analyses.features import feature_grid_mapping

    shape = {}
    mod = dict(model.named_modules())[layer]

    def hook(m: nn.Module, i: Any, o: Any) -> None:
        shape.setdefault("s", tuple(o.shape[-2:]))

    h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        h.remove()
    geo = feature_grid_mapping(model, layer, input_size, shape["s"])
    geo["grid"] = shape["s"]
    return geo


def unit_for_point(geo: Mapping[str, Any], y: float, x: float) -> Tuple[int, int]:
    """The grid cell whose RF centre is nearest the input point (y, x) (pixel centres at k + 0.5)."""
    out = []
    for v, n, s, c0 in zip((y - 0.5, x - 0.5), geo["grid"], geo["stride"], geo["center0"]):
        out.append(int(min(max(round((v - c0) / s), 0), n - 1)))
    return out[0], out[1]


def box_mask(box: Any, hw: Tuple[int, int]) -> np.ndarray:
    """Boolean H x W mask of the pixels whose centre lies inside ``box`` = [x, y, w, h]."""
    x, y, w, h = (float(v) for v in box)
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]] + 0.5
    return (yy >= y) & (yy <= y + h) & (xx >= x) & (xx <= x + w)


def sample_per_bin(size_bins: np.ndarray, per_bin: int, seed: int) -> Dict[int, np.ndarray]:
    """``per_bin`` seeded indices of each size bin (fewer when a bin is smaller)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in sorted(set(int(v) for v in size_bins if v >= 0)):
        idx = np.nonzero(size_bins == b)[0]
        out[b] = np.sort(rng.choice(idx, min(per_bin, len(idx)), replace=False))
    return out


def checkpoint_first(checkpoints: Mapping[str, Any]) -> Dict[str, Path]:
    """``{op: path}`` from ``{op: path}`` or ``{op: [path per seed]}`` (the first seed)."""
    return {op: Path(p[0] if isinstance(p, (list, tuple)) else p) for op, p in checkpoints.items()}
