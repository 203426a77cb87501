"""Helpers shared by the figures that analyse trained models: loading, test data, layers, geometry."""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError

from erf_lab.io import PathLike


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


def checkpoints_per_seed(checkpoints: Mapping[str, Any]) -> Dict[str, List[Path]]:
    """``{op: [path per seed]}`` from ``{op: path}`` or ``{op: [path per seed]}``, cut to the seed
    count every variant has (the statistics pair the variants seed by seed)."""
    lists = {op: [Path(q) for q in (p if isinstance(p, (list, tuple)) else [p])] for op, p in checkpoints.items()}
    n = min((len(v) for v in lists.values()), default=0)
    return {op: v[:n] for op, v in lists.items()}


def checkpoint_names(checkpoints: Mapping[str, Any]) -> Dict[str, List[str]]:
    """``{op: [path string per seed]}`` of ``{op: path}`` or ``{op: [path per seed]}`` (run metadata)."""
    return {op: [str(q) for q in (p if isinstance(p, (list, tuple)) else [p])] for op, p in checkpoints.items()}


def load_seeds(checkpoints: Mapping[str, Any], device: str = "cpu") -> Dict[str, List[Any]]:
    """``{op: [LoadedModel per seed]}`` in eval mode on ``device``."""
    per_seed = checkpoints_per_seed(checkpoints)
    out = {op: list(load_models({i: p for i, p in enumerate(paths)}, device).values())
           for op, paths in per_seed.items() if paths}
    if not out:
        raise ErfLabError("no models to analyse")
    return out


def stack_items(ds: Any, indices: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Items ``indices`` of ``ds`` (default all), rendered once: ``image`` (N, C, H, W), ``label``,
    ``size_bin``, ``box`` (N, 4: x, y, w, h) and ``index`` (N,) arrays."""
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    items = [ds[int(i)] for i in idx]
    return {"image": torch.stack([it["image"] for it in items]),
            "label": np.array([int(it["label"]) for it in items]),
            "size_bin": np.array([int(it["size_bin"]) for it in items]),
            "box": np.stack([np.asarray(it["box"], dtype=np.float64) for it in items]) if items else np.zeros((0, 4)),
            "index": idx}


def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Predicted class of each image of the (N, C, H, W) tensor, as an int array."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            out.append(model(images[s:s + batch_size].to(device)).argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def instance_erf_maps(model: nn.Module, images: torch.Tensor, layer: str, units: np.ndarray, *,
                      batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Instance ERFs of many images at once: ``|d relu(y[n, :, u_n]).sum() / d x_n|`` summed over colour.

    The ``replknet`` target with ``grad_rectify="abs"`` (what :func:`erf_lab.instance_erf` computes
    one image at a time) for an NCHW layer, each image ``n`` with its own unit ``units[n] = (y, x)``.
    The model is in eval mode, so the images of a batch do not interact and one backward pass
    gives every image's map. Returns (N, H, W) float64.
    """
    from erf_lab.layers import get_layer, run_to_layer

    mod = get_layer(model, layer)
    maps = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device).requires_grad_(True)
        u = torch.as_tensor(np.asarray(units[s:s + batch_size]), device=device)
        with torch.enable_grad():
            y = run_to_layer(model, x, mod, stop=True)
            if not isinstance(y, torch.Tensor) or y.dim() != 4:
                raise ErfLabError(f"layer {layer!r} does not output an NCHW map")
            v = y[torch.arange(len(x), device=device), :, u[:, 0], u[:, 1]]
            (g,) = torch.autograd.grad(torch.relu(v).sum(), x)
        maps.append(g.double().abs().sum(1).cpu().numpy())
    return np.concatenate(maps) if maps else np.zeros((0,) + tuple(images.shape[-2:]))


def mass_in_box(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each (H, W) map's mass on the pixels whose centre lies inside its box (x, y, w, h)."""
    hw = maps.shape[-2:]
    out = np.full(len(maps), np.nan)
    for k, (m, b) in enumerate(zip(maps, boxes)):
        total = float(m.sum())
        if total > 0:
            out[k] = float(m[box_mask(b, hw)].sum() / total)
    return out


def spread(maps: np.ndarray) -> np.ndarray:
    """Mass-weighted RMS distance from each map's centre of mass, per axis: sqrt((var_y + var_x) / 2), in pixels."""
    n, h, w = maps.shape
    yy = (np.arange(h) + 0.5)[None, :, None]
    xx = (np.arange(w) + 0.5)[None, None, :]
    tot = maps.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        my = (maps * yy).sum(axis=(1, 2)) / tot
        mx = (maps * xx).sum(axis=(1, 2)) / tot
        vy = (maps * (yy - my[:, None, None]) ** 2).sum(axis=(1, 2)) / tot
        vx = (maps * (xx - mx[:, None, None]) ** 2).sum(axis=(1, 2)) / tot
        return np.where(tot > 0, np.sqrt((vy + vx) / 2), np.nan)
