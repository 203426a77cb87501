"""Feature extraction from any layer of a model over a labelled data set.

Two poolings of the layer's feature map (N, C, H', W'):

* ``"gap"``: global average pooling, the usual image descriptor;
* ``"box"``: the mean of the bilinearly interpolated map over the object's box (for
  multi-object images). The box, given in input pixels, is mapped onto the feature grid
  with the layer's effective stride and the centre of its first unit (theoretical receptive
  field, :func:`erf_lab.rf.trace_rf`): feature coordinate ``f = (p - centre0) / stride`` for
  input-pixel coordinate ``p`` (pixel centres at integers). The mean is the exact integral
  of the bilinear interpolant (constant beyond the outer cell centres, as ``align_corners=False``
  resampling is) over the box, divided by its area, so a box covering the whole image gives
  exactly the global average pool. Box edges on the image border map onto the map border.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from erf_lab.layers import get_layer, run_to_layer, select_output
from erf_lab.device import resolve_device
from erf_lab.progress import loader_bar
from erf_lab.errors import ErfLabError
from erf_lab.layers import LayerGrid, check_input_size, default_layer, output_module, spatial_grid, static_batch, to_nchw

from erf_lab.io import PathLike, atomic_write, dumps, versions, write_text

__all__ = [
    "Features",
    "extract_features",
    "resolve_layer",
    "resolve_layer_grid",
    "box_pool",
    "box_to_grid",
    "stratified_sample",
    "feature_grid_mapping",
    "POOLINGS",
]

POOLINGS = ("gap", "box")


@dataclass
class Features:
    """Pooled features of a set of samples, with what is known about each sample.

    Attributes:
        features (numpy.ndarray[float32, N, D]): one row per sample.
        labels (numpy.ndarray[int64, N]): class label (-1 unlabelled).
        size_bins (numpy.ndarray[int64, N]): box-size bin (-1 unknown).
        sizes (numpy.ndarray[float64, N]): object size ``sqrt(w * h)`` (NaN unknown).
        indices (numpy.ndarray[int64, N]): index of the sample in its data set split.
        class_names (list[str]): names of the labels ``0..K-1``.
        size_bin_edges (list[float] | None): ``B + 1`` edges of the size bins.
        meta (dict): layer, pooling, stride mapping, data spec, seed, versions...
    """

    features: np.ndarray
    labels: np.ndarray
    size_bins: np.ndarray
    sizes: np.ndarray
    indices: np.ndarray
    class_names: List[str] = field(default_factory=list)
    size_bin_edges: Optional[List[float]] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: PathLike) -> Path:
        """Writes ``path`` (``.npz`` arrays) and ``path`` with ``.json`` (names, edges, meta), atomically."""
        path = Path(path).with_suffix(".npz")
        arrays = {k: getattr(self, k) for k in ("features", "labels", "size_bins", "sizes", "indices")}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
        info = {"class_names": self.class_names, "size_bin_edges": self.size_bin_edges, "meta": self.meta}
        write_text(path.with_suffix(".json"), dumps(info))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "Features":
        """Reads what :meth:`save` wrote."""
        import json

        path = Path(path).with_suffix(".npz")
        if not path.is_file():
            raise ErfLabError(f"no saved features at {path}")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return cls(**arrays, class_names=info["class_names"], size_bin_edges=info["size_bin_edges"], meta=info["meta"])


# ---- sampling ------------------------------------------------------------------------------------


def stratified_sample(strata: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of ``n`` of the ``len(strata)`` items, every stratum keeping its share.

    Each stratum gets ``n * count / total`` items rounded by largest remainder (so the total is
    exactly ``n``), drawn at random with ``seed``.
    """
    strata = np.asarray(strata)
    total = len(strata)
    if n >= total:
        return np.arange(total)
    if n < 1:
        raise ErfLabError(f"max_samples must be >= 1, got {n}")
    values, inverse, counts = np.unique(strata, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    remainder = n - int(take.sum())
    if remainder:
        order = np.lexsort((np.arange(len(counts)), -(quota - take)))  # largest remainders first, stable
        take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inverse == s), size=int(k), replace=False) for s, k in enumerate(take) if k]
    return np.sort(np.concatenate(chosen))


# ---- layer resolution ----------------------------------------------------------------------------


def resolve_layer_grid(model: nn.Module, layer: Optional[str], example: Tensor) -> Tuple[str, nn.Module, LayerGrid]:
    """The layer to read features from and how its output lies on the image: ``(name, module, grid)``.

    With ``layer=None``: :func:`erf_lab.layers.default_layer` (the module whose output
    ``forward_features`` returns, else the last spatial map or token grid larger than 1x1), the
    rule ``erf-lab erf`` uses. NHWC maps and token grids are read as (N, C, H', W') maps.

    Raises:
        ErfLabError: no such layer (lists close matches), or the layer's output is not a
            spatial map or token grid.
    """
    hw = (int(example.shape[-2]), int(example.shape[-1]))
    check_input_size(model, hw)
    try:
        return _resolve_layer_grid(model, layer, example, hw)
    except ErfLabError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model refused the input: one line, not its traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ErfLabError(f"the model does not run on a {hw[0]}x{hw[1]} input ({type(exc).__name__}: {first})") from exc


def _resolve_layer_grid(model: nn.Module, layer: Optional[str], example: Tensor, hw) -> Tuple[str, nn.Module, LayerGrid]:
    if layer in (None, ""):
        chosen = default_layer(model, example)
        name = chosen.name if chosen.name is not None else output_module(model, example)
        if name is None:  # the output is the map and no module returns it: hook the model itself
            return "", model, chosen.grid
        return name, get_layer(model, name), chosen.grid
    module = get_layer(model, layer)
    with torch.no_grad():
        out = select_output(run_to_layer(model, example, module, stop=True))
    grid = spatial_grid(out, hw, model)
    if grid is None:
        raise ErfLabError(
            f"layer {layer!r} outputs shape {list(out.shape)}, not a spatial map (N, C, H, W) or token grid: "
            "pick a convolutional layer (list them with `erf-lab layers`)"
        )
    return str(layer), module, grid


def resolve_layer(model: nn.Module, layer: Optional[str], example: Tensor) -> Tuple[str, nn.Module, Tuple[int, ...]]:
    """``(name, module, shape)`` of :func:`resolve_layer_grid`, the shape as an (N, C, H', W') map."""
    name, module, grid = resolve_layer_grid(model, layer, example)
    with torch.no_grad():
        out = to_nchw(select_output(run_to_layer(model, example, module, stop=True)), grid)
    return name, module, tuple(out.shape)


# ---- box pooling ---------------------------------------------------------------------------------


def feature_grid_mapping(
    model: nn.Module, layer: str, input_size: Sequence[int], map_hw: Tuple[int, int]
) -> Dict[str, Any]:
    """Stride and first-unit centre (input pixels) of ``layer``'s grid, per axis.

    From the theoretical receptive field when the model can be traced; otherwise from the
    ratio of input to map size (``stride = H / H'``, ``centre0 = (stride - 1) / 2``), and
    ``source`` says which.
    """
    c, h, w = (int(v) for v in input_size)
    try:
        from erf_lab.rf import trace_rf

        rf = trace_rf(model, (c, h, w)).of(layer)
        if rf.spatial and tuple(rf.shape[1:]) == tuple(map_hw):
            return {"stride": (float(rf.y.jump), float(rf.x.jump)), "center0": (float(rf.y.center0), float(rf.x.center0)),
                    "source": "theoretical receptive field"}
        note = "traced grid does not match the hooked output"
    except ErfLabError as exc:
        note = str(exc)
    except Exception as exc:  # noqa: BLE001 - any tracing problem falls back to the size ratio
        note = f"{type(exc).__name__}: {exc}".splitlines()[0]
    sy, sx = h / map_hw[0], w / map_hw[1]
    return {"stride": (sy, sx), "center0": ((sy - 1) / 2, (sx - 1) / 2), "source": f"size ratio ({note})"}


def box_to_grid(
    boxes: Tensor, image_hw: Tuple[int, int], map_hw: Tuple[int, int], stride: Sequence[float], center0: Sequence[float]
) -> Tensor:
    """Boxes ``[x, y, w, h]`` (input pixels, pixel ``k`` spanning ``[k, k + 1)``) -> feature-grid
    intervals ``[y0, y1, x0, x1]`` (cell ``i`` spanning ``[i - 0.5, i + 0.5]``), clipped to the map.

    Edges on (or beyond) the image border map onto the map border; boxes narrower than one
    input pixel are widened to one pixel about their centre.
    """
    boxes = boxes.to(torch.float64)
    out = []
    for axis, (lo_col, len_col) in enumerate(((1, 3), (0, 2))):  # y then x
        size_in, size_map = image_hw[axis], map_hw[axis]
        lo, length = boxes[:, lo_col], boxes[:, len_col].clamp(min=0)
        centre = lo + length / 2
        length = length.clamp(min=1.0)
        lo, hi = (centre - length / 2).clamp(0, size_in), (centre + length / 2).clamp(0, size_in)
        to_grid = lambda p: (p - 0.5 - center0[axis]) / stride[axis]  # noqa: E731 - edge -> centre coords
        g0 = torch.where(lo <= 0, torch.full_like(lo, -0.5), to_grid(lo))
        g1 = torch.where(hi >= size_in, torch.full_like(hi, size_map - 0.5), to_grid(hi))
        g0, g1 = g0.clamp(-0.5, size_map - 0.5), g1.clamp(-0.5, size_map - 0.5)
        min_width = min(1.0 / stride[axis], float(size_map))
        mid = (g0 + g1) / 2
        narrow = (g1 - g0) < min_width
        g0 = torch.where(narrow, (mid - min_width / 2).clamp(-0.5, size_map - 0.5 - min_width), g0)
        g1 = torch.where(narrow, g0 + min_width, g1)
        out += [g0, g1]
    return torch.stack(out, 1)


def _hat_cdf(u: Tensor) -> Tensor:
    """Integral from -inf to u of the hat function max(0, 1 - |s|)."""
    u = u.clamp(-1, 1)
    return torch.where(u <= 0, (u + 1) ** 2 / 2, 1 - (1 - u) ** 2 / 2)


def _axis_weights(a: Tensor, b: Tensor, n: int) -> Tensor:
    """(N, n) integrals over [a, b] of the n basis functions of 1-D linear interpolation on
    cell centres 0..n-1, constant beyond the outer centres (the map spans [-0.5, n - 0.5])."""
    t = torch.arange(n, dtype=a.dtype, device=a.device)
    if n == 1:
        return (b - a)[:, None]
    ma, mb = a.clamp(0, n - 1), b.clamp(0, n - 1)
    w = _hat_cdf(mb[:, None] - t) - _hat_cdf(ma[:, None] - t)
    w[:, 0] += (torch.minimum(b, torch.zeros_like(b)) - a).clamp(min=0)
    w[:, -1] += (b - torch.maximum(a, torch.full_like(a, n - 1))).clamp(min=0)
    return w


def box_pool(fmap: Tensor, grid_boxes: Tensor) -> Tensor:
    """Mean of the bilinear interpolant of ``fmap`` over each box.

    Args:
        fmap (Tensor[N, C, H', W']): feature maps.
        grid_boxes (Tensor[N, 4]): ``[y0, y1, x0, x1]`` in feature-grid coordinates
            (cell ``i`` centred at ``i``; the map spans ``[-0.5, H' - 0.5]``), from :func:`box_to_grid`.

    Returns:
        Tensor[N, C]: exact integral of the interpolant over the box divided by its area
        (the global average pool for the box ``[-0.5, H' - 0.5, -0.5, W' - 0.5]``).

    Example::

        >>> f = torch.arange(16.).view(1, 1, 4, 4)
        >>> box_pool(f, torch.tensor([[-0.5, 3.5, -0.5, 3.5]])).item()
        7.5
    """
    if fmap.dim() != 4 or grid_boxes.shape != (fmap.shape[0], 4):
        raise ValueError(f"box_pool expects fmap [N, C, H, W] and boxes [N, 4], got {list(fmap.shape)} and {list(grid_boxes.shape)}")
    gb = grid_boxes.to(torch.float64)
    wy = _axis_weights(gb[:, 0], gb[:, 1], fmap.shape[2])
    wx = _axis_weights(gb[:, 2], gb[:, 3], fmap.shape[3])
    area = (gb[:, 1] - gb[:, 0]) * (gb[:, 3] - gb[:, 2])
    pooled = torch.einsum("nchw,nh,nw->nc", fmap.to(torch.float64), wy, wx) / area[:, None]
    return pooled.to(fmap.dtype)


# ---- extraction ----------------------------------------------------------------------------------


def _unwrap(model: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    if isinstance(model, nn.Module):
        return model, {}
    if hasattr(model, "model") and isinstance(model.model, nn.Module):  # erf_lab.LoadedModel
        return model.model, {"path": getattr(model, "path", ""), "kind": getattr(model, "kind", ""),
                             "arch": (getattr(model, "meta", {}) or {}).get("arch")}
    raise ErfLabError(f"expected a torch.nn.Module or a loaded model, got {type(model).__name__}")


def _pooled_batches(net: nn.Module, loader: Any, module: nn.Module, layer_name: str, layer_grid: Any, pooling: str,
                    mapping: Optional[Dict[str, Any]], image_hw: Tuple[int, int], device: torch.device, progress: bool):
    """Runs the batches to the layer and pools each map: (feature chunks, labels, size bins, indices, boxes)."""
    map_hw = layer_grid.grid
    chunks: List[np.ndarray] = []
    labels, bins, indices, boxes = [], [], [], []
    with torch.no_grad():
        for batch in loader_bar(loader, desc=f"features {layer_name} ({pooling})", enabled=progress, leave=False):
            x = batch["image"].to(device)
            fmap = to_nchw(select_output(run_to_layer(net, x, module, stop=True)), layer_grid)
            if fmap.dim() != 4 or tuple(fmap.shape[2:]) != map_hw:
                raise ErfLabError(f"layer {layer_name!r} changed its output shape to {list(fmap.shape)} between batches")
            if pooling == "gap":
                pooled = fmap.float().mean(dim=(2, 3))
            else:
                grid = box_to_grid(batch["box"].to(device), image_hw, map_hw, mapping["stride"], mapping["center0"])
                pooled = box_pool(fmap.float(), grid)
            chunks.append(pooled.cpu().numpy().astype(np.float32))
            labels.append(batch["label"].numpy())
            bins.append(batch["size_bin"].numpy())
            indices.append(batch["index"].numpy())
            boxes.append(batch["box"].numpy())
    return chunks, labels, bins, indices, boxes


def _sizes(dataset: Any, positions: np.ndarray, box: np.ndarray, size_bins: np.ndarray) -> np.ndarray:
    """Object sizes sqrt(w h): the data set's own where it records them, else the boxes'; NaN without a bin."""
    ds_sizes = getattr(dataset, "sizes", None)
    if ds_sizes is not None:
        sizes = np.asarray(ds_sizes, dtype=np.float64)[positions]
    else:
        sizes = np.sqrt(np.clip(box[:, 2], 0, None) * np.clip(box[:, 3], 0, None))
    return np.where(size_bins >= 0, sizes, np.nan)


def extract_features(
    model: Union[nn.Module, Any], dataset: Any, *, layer: Optional[str] = None, pooling: str = "gap",
    max_samples: Optional[int] = None, batch_size: int = 64, device: Union[str, torch.device, None] = None,
    seed: int = 0, progress: bool = True,
) -> Features:
    """Pooled features of ``layer`` for the samples of ``dataset``.

    Args:
        model: an ``nn.Module`` or an :class:`erf_lab.LoadedModel`; run in eval mode, no gradients.
        dataset: items are dicts with ``image`` (Tensor[C, H, W]), ``label``, ``box``
            (Tensor[4], ``[x, y, w, h]`` pixels), ``size_bin`` and ``index``
            (:func:`erf_lab.data.open_data`).
        layer: module name (``model.named_modules()``); None: the last convolutional stage
            (see :func:`resolve_layer`).
        pooling: ``"gap"`` (global average pool) or ``"box"`` (bilinear mean inside the box).
        max_samples: keep this many samples, stratified by class x size bin (seeded).
        batch_size: images per forward.
        device: where the model runs (default: CUDA when available).
        seed: seed of the sampling.
        progress: show a tqdm bar.

    Returns:
        :class:`Features`.

    Raises:
        ErfLabError: bad layer name (close matches listed), a layer without a spatial map,
            an unknown pooling, an empty data set.

    Example::

        >>> from dk_ops import models
        >>> from erf_lab.data import open_data
        >>> net = models.create("study_net", num_classes=10)
        >>> f = extract_features(net, open_data("noise", num_images=8), progress=False)
        >>> f.features.shape
        (8, 64)
    """
    from torch.utils.data import DataLoader, Subset

    if pooling not in POOLINGS:
        raise ErfLabError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if batch_size < 1:
        raise ErfLabError(f"batch size must be >= 1, got {batch_size}")
    net, model_meta = _unwrap(model)
    n_total = len(dataset)
    if n_total == 0:
        raise ErfLabError("the data set is empty: no samples to extract features from")
    labels_all = np.asarray(getattr(dataset, "labels", np.full(n_total, -1)), dtype=np.int64)
    bins_all = np.asarray(getattr(dataset, "size_bins", np.full(n_total, -1)), dtype=np.int64)
    positions = np.arange(n_total)
    if max_samples is not None:
        positions = stratified_sample(np.stack([labels_all, bins_all], 1), int(max_samples), seed)
    device = resolve_device(device)
    was_training = net.training
    net.eval().to(device)

    first = dataset[int(positions[0])]
    example = first["image"][None].to(device)
    layer_name, module, layer_grid = resolve_layer_grid(net, layer, example)
    image_hw = tuple(int(s) for s in example.shape[2:])
    map_hw = layer_grid.grid
    mapping = None
    if pooling == "box":
        mapping = feature_grid_mapping(net, layer_name, (int(example.shape[1]),) + image_hw, map_hw)

    batch_size = static_batch(net) or batch_size  # a torch.export program with a static batch of 1
    loader = DataLoader(Subset(dataset, positions.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
    try:
        chunks, labels, bins, indices, boxes = _pooled_batches(net, loader, module, layer_name, layer_grid, pooling,
                                                               mapping, image_hw, device, progress)
    finally:
        net.train(was_training)
    features = np.concatenate(chunks)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(1)).sum())
        raise ErfLabError(f"{bad} of {len(features)} feature vectors are not finite (NaN/inf in layer {layer_name!r})")
    size_bins = np.concatenate(bins).astype(np.int64)
    sizes = _sizes(dataset, positions, np.concatenate(boxes).astype(np.float64), size_bins)
    meta = {
        "layer": layer_name, "layer_shape": [int(features.shape[1]), *map_hw], "layer_layout": layer_grid.layout,
        "prefix_tokens": layer_grid.prefix, "pooling": pooling,
        "box_mapping": None if mapping is None else {k: list(v) if isinstance(v, tuple) else v for k, v in mapping.items()},
        "input_size": [int(example.shape[1]), *image_hw], "data": getattr(dataset, "spec", type(dataset).__name__),
        "split": getattr(dataset, "split", None), "n_samples": int(len(features)), "n_available": int(n_total),
        "max_samples": max_samples,
        "sampling": "stratified by class x size bin" if max_samples is not None and max_samples < n_total else "all",
        "seed": seed, "model": model_meta, "versions": versions("scikit-learn", "openTSNE"),
    }
    return Features(
        features=features,
        labels=np.concatenate(labels).astype(np.int64),
        size_bins=size_bins,
        sizes=sizes,
        indices=np.concatenate(indices).astype(np.int64),
        class_names=list(getattr(dataset, "class_names", []) or []),
        size_bin_edges=getattr(dataset, "size_bin_edges", None),
        meta=meta,
    )
