"""The ERF engine: effective receptive fields by back-propagating a unit's activation to the image.

The ERF of output unit ``u`` of layer ``L`` is ``d target / d x`` where ``target`` reduces
``L``'s activation at ``u`` over channels; over a data set it is the mean over images of a
per-image reduction of the input gradient over colour channels (docs/design.md section 3).

Speed: images are batched (eval mode keeps per-image gradients independent, so the
gradient of the batch sum is every image's own gradient), the forward stops at ``L``, the
parameters' gradients are never built, accumulation stays on the device in float64,
non-finite per-image maps are skipped and counted, and when the unit provably reads only
its theoretical receptive field, only a stride-aligned crop around that field is computed
(with intermediate maps cropped to the unit's cone). "Provably": the traced graph says so,
and the first batch checks it before its backward: one image's raw channel vectors at the
units, computed with crop and cone inside the real batch, must equal a plain batch-1 forward
on the crop framed by strong noise (global pooling, SE, GroupNorm, routing or attention change
them); otherwise the cone, then the crop, is dropped. The check costs one batch-1 forward.
"""
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import distributed as _dist
from .layers import get_layer, hook_all, run_to_layer, select_output, unit_activation
from ._layout import resolve_channels_last, to_channels_last
from .progress import progress as progress_bar
from .errors import ErfLabError
from .layers import LayerGrid, check_input_size, default_layer, output_grid, probe_size, spatial_grid, static_batch
from .metrics import erf_metrics, replknet_transform
from .io import atomic_write, dumps, versions

__all__ = ["compute_erf", "auto_batch_size", "check_memory", "ERFResult", "PRESETS", "ERFOptions"]

_UNSET: Any = object()


@dataclass(frozen=True)
class ERFOptions:
    """The named choices of an ERF protocol.

    Attributes:
        target_rectify: ``"relu"`` or None: applied to the unit's channel vector.
        target_reduction: ``"sum"`` or ``"mean"`` over channels.
        grad_rectify: ``"relu"``, ``"abs"``, ``"square"`` or None: per colour channel of the gradient.
        color_reduction: ``"sum"`` or ``"mean"`` over colour channels.
        map_rectify: ``"clamp"`` (at 0, after the colour reduction, per image) or None.
        normalize: display transform of the aggregate: ``"log_max"`` (log10(x+1)/max),
            ``"max"``, ``"sum"`` or None.
    """

    target_rectify: Optional[str] = "relu"
    target_reduction: str = "sum"
    grad_rectify: Optional[str] = "relu"
    color_reduction: str = "sum"
    map_rectify: Optional[str] = None
    normalize: Optional[str] = "log_max"

    def __post_init__(self) -> None:
        allowed = {
            "target_rectify": (None, "relu"),
            "target_reduction": ("sum", "mean"),
            "grad_rectify": (None, "relu", "abs", "square"),
            "color_reduction": ("sum", "mean"),
            "map_rectify": (None, "clamp"),
            "normalize": (None, "log_max", "max", "sum"),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ErfLabError(f"{name} must be one of {values}, got {getattr(self, name)!r}")


PRESETS: Dict[str, ERFOptions] = {
    # RepLKNet erf/: relu(y[:, :, u]).sum(); relu(grad) summed over colour; mean; log10(x+1)/max.
    "replknet": ERFOptions("relu", "sum", "relu", "sum", None, "log_max"),
    # Luo et al. 2016: gradient 1 at u on every channel, signed colour sum.
    "luo": ERFOptions(None, "sum", None, "sum", None, "max"),
    # OpenERF: mean over channels of the raw activation; mean over colour, clamp at 0; sum to 1.
    "openerf": ERFOptions(None, "mean", None, "mean", "clamp", "sum"),
}


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

    def display(self, normalize: Optional[str] = _UNSET) -> np.ndarray:
        """The map after the preset's display transform (or ``normalize``)."""
        norm = self.meta.get("options", {}).get("normalize") if normalize is _UNSET else normalize
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
            from .heatmap import save_erf_figure

            save_erf_figure(self, d / "erf.png")
            if self.image is not None:
                save_erf_figure(self, d / "erf_overlay.png", overlay=True)

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(d / "erf.npz", write_npz)
        atomic_write(d / "erf.json", lambda tmp: Path(tmp).write_text(text + "\n"))
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
        from .heatmap import plot_erf

        return plot_erf(self, ax=ax, **kwargs)


# ---------------------------------------------------------------------------------------------
# data


class _Source:
    """Indexable images from a tensor, a Dataset of dicts / tensors / (image, label) tuples."""

    def __init__(self, data: Any) -> None:
        self.data = data
        if isinstance(data, Tensor):
            if data.dim() == 3:
                self.data = data.unsqueeze(0)
            elif data.dim() != 4:
                raise ErfLabError(f"an image tensor must be (C,H,W) or (N,C,H,W), got shape {list(data.shape)}")
        elif not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise ErfLabError(f"data must be an image tensor (N,C,H,W), a Dataset of images or a data spec "
                              f"string such as 'digits-ms' or 'noise', got {type(data).__name__}")

    def __len__(self) -> int:
        return len(self.data)

    def image(self, i: int) -> Tensor:
        item = self.data[i]
        if isinstance(item, dict):
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor):
            item = torch.as_tensor(np.asarray(item))
        if item.dim() != 3:
            raise ErfLabError(f"item {i} is not an image tensor (C,H,W): shape {list(item.shape)}")
        return item

    def labels(self) -> np.ndarray:
        if hasattr(self.data, "labels"):
            return np.asarray(self.data.labels)
        out = []
        for i in range(len(self)):
            item = self.data[i]
            out.append(item["label"] if isinstance(item, dict) else item[1] if isinstance(item, (tuple, list)) else -1)
        return np.asarray([int(v) for v in out])


def _select(source: _Source, num_images: Optional[int], sampling: str, seed: int) -> List[int]:
    n = len(source)
    if n == 0:
        raise ErfLabError("the data set is empty")
    k = n if num_images is None else min(int(num_images), n)
    g = torch.Generator().manual_seed(int(seed))
    if sampling == "random":
        return torch.randperm(n, generator=g)[:k].tolist()
    if sampling == "stratified":
        labels = source.labels()
        classes = sorted(set(labels.tolist()))
        queues = {c: [i for i in torch.randperm(n, generator=g).tolist() if labels[i] == c] for c in classes}
        out: List[int] = []
        while len(out) < k:
            for c in classes:
                if queues[c] and len(out) < k:
                    out.append(queues[c].pop(0))
        return out
    if sampling == "first":
        return list(range(k))
    raise ErfLabError(f"sampling must be 'random' or 'stratified', got {sampling!r}")


# ---------------------------------------------------------------------------------------------
# geometry


@dataclass
class _Geometry:
    layout: str
    grid: Tuple[int, int]
    prefix: int
    units: List[Tuple[int, int]]
    centers: List[Tuple[float, float]]
    rf_size: Optional[Tuple[float, float]]
    local: bool
    rf_note: str
    jump: Tuple[float, float]
    graph: Any = None  # the traced RFGraph (None when the model could not be traced)
    rf: Any = None  # the target's LayerRF


def _nearest(c0: float, jump: float, n: int, target: float) -> int:
    i = (target - c0) / jump
    lo = min(max(int(math.floor(i)), 0), n - 1)
    hi = min(lo + 1, n - 1)
    return lo if abs(c0 + lo * jump - target) <= abs(c0 + hi * jump - target) else hi


def _geometry(model, layer, output_index, layout, prefix_tokens, units_arg, x0: Tensor) -> _Geometry:
    """Layer grid, units and their RF centres (theoretical RF when the graph can be traced)."""
    from .rf import trace_rf

    c, h, w = x0.shape
    get_layer(model, layer)  # a clear error for a wrong name before anything runs
    rf, note, graph = None, "", None
    if layout in ("auto", "nchw"):
        try:
            graph = trace_rf(model, (c, h, w))
            rf = graph.of(layer, output_index)
        except ErfLabError as exc:
            note = str(exc)
    lg = None
    if rf is not None and rf.spatial:  # the traced shapes give the grid without running the model
        if layout == "nchw":
            lg = LayerGrid("nchw", (int(rf.shape[1]), int(rf.shape[2])))
        else:
            g = spatial_grid(torch.empty((1,) + tuple(rf.shape), device="meta"), (h, w), model, prefix_tokens)
            lg = g if g is not None and g.layout == "nchw" else None
    if lg is None:  # NHWC, tokens, or no trace: read the grid off a forward to the layer
        rf = None
        with torch.no_grad():
            y = select_output(run_to_layer(model, x0.unsqueeze(0), get_layer(model, layer)), output_index)
        lg = output_grid(y, (h, w), layout, prefix_tokens, model)
    layout, grid, prefix = lg.layout, lg.grid, lg.prefix
    if rf is not None:
        cy0, cx0, jy, jx = rf.y.center0, rf.x.center0, rf.y.jump, rf.x.jump
        size = (rf.y.size, rf.x.size)
        local = rf.local()
    else:  # geometric fallback: cells tile the image evenly
        jy, jx = h / grid[0], w / grid[1]
        cy0, cx0 = (jy - 1) / 2, (jx - 1) / 2
        size, local = None, False
        note = note or f"no theoretical RF for layout {layout}"
    if isinstance(units_arg, str):
        if units_arg != "center":
            raise ErfLabError(f"unit must be 'center' or (y, x), got {units_arg!r}")
        units = [(_nearest(cy0, jy, grid[0], (h - 1) / 2), _nearest(cx0, jx, grid[1], (w - 1) / 2))]
    else:
        seq = list(units_arg)
        units = [tuple(int(v) for v in u) for u in (seq if seq and isinstance(seq[0], (tuple, list)) else [seq])]
    resolved = []
    for u in units:  # negative indices count from the end, as in Python
        if len(u) != 2 or not (-grid[0] <= u[0] < grid[0] and -grid[1] <= u[1] < grid[1]):
            raise ErfLabError(f"unit {tuple(u)} is outside the layer's {grid[0]}x{grid[1]} grid")
        resolved.append((u[0] % grid[0], u[1] % grid[1]))
    units = resolved
    centers = [(cy0 + u[0] * jy, cx0 + u[1] * jx) for u in units]
    return _Geometry(layout, grid, prefix, units, centers, size, local, note, (jy, jx), graph, rf)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """Images are fed in the dtype of the model's first floating parameter (or buffer): a float64
    model is analysed in float64. Default dtype when the model holds no floating tensor."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _crop_window(geo: _Geometry, hw: Tuple[int, int]) -> Optional[Tuple[int, int, int, int]]:
    """Stride-aligned (y0, x0, y1, x1) crop holding every unit's field, or None when it saves nothing."""
    if not geo.local or geo.rf_size is None:
        return None
    jy, jx = geo.jump
    if jy != int(jy) or jx != int(jx):
        return None
    jy, jx = int(jy), int(jx)
    box = []
    y0 = min(c[0] - (geo.rf_size[0] - 1) / 2 for c in geo.centers)
    y1 = max(c[0] + (geo.rf_size[0] - 1) / 2 for c in geo.centers)
    x0 = min(c[1] - (geo.rf_size[1] - 1) / 2 for c in geo.centers)
    x1 = max(c[1] + (geo.rf_size[1] - 1) / 2 for c in geo.centers)
    h, w = hw
    for lo, hi, n, j in ((y0, y1, h, jy), (x0, x1, w, jx)):
        a = max(0, int(math.floor(lo)) // j * j)
        b = min(n, a + math.ceil((min(n - 1, math.ceil(hi)) + 1 - a) / j) * j)
        box.append((a, b))
    (ya, yb), (xa, xb) = box
    if (yb - ya) * (xb - xa) >= 0.6 * h * w:  # too little to gain for the check it costs
        return None
    return ya, xa, yb, xb


# ---------------------------------------------------------------------------------------------
# the engine


class _Engine:
    def __init__(self, model, layer, output_index, geo: _Geometry, opts: ERFOptions, stop: bool) -> None:
        self.model, self.layer_name, self.output_index = model, layer, output_index
        self.layer = get_layer(model, layer)
        self.geo, self.opts, self.stop = geo, opts, stop
        self.origin: Tuple[int, int] = (0, 0)  # top-left pixel of the input crop
        self.cone = None  # a _cone.ConeCrop when cone pruning is on

    def units_for(self, shift: Tuple[int, int]) -> List[Tuple[int, int]]:
        return [(u[0] - shift[0], u[1] - shift[1]) for u in self.geo.units]

    def forward(self, x: Tensor, cone: bool = True) -> Tuple[Any, List[Tuple[int, int]]]:
        """Runs to the layer on a batch (cropped at ``origin``); returns the output and the units in it."""
        if self.cone is not None and cone:
            with self.cone.active(self.origin):
                out = run_to_layer(self.model, x, self.layer, stop=self.stop)
            return out, self.units_for(self.cone.shift())
        out = run_to_layer(self.model, x, self.layer, stop=self.stop)
        if self.origin == (0, 0):
            return out, list(self.geo.units)
        jy, jx = (int(v) for v in self.geo.jump)
        return out, self.units_for((self.origin[0] // jy, self.origin[1] // jx))

    def unit_vectors(self, out: Any, units: List[Tuple[int, int]]) -> Tensor:
        """The raw channel vectors at the units: (B * U, C)."""
        return unit_activation(select_output(out, self.output_index), self.geo.layout, units, self.geo.grid[1], self.geo.prefix)

    def reduce(self, v: Tensor) -> Tensor:
        """Channel vectors (B * U, C) -> the targets (B * U,)."""
        if self.opts.target_rectify == "relu":
            v = F.relu(v)
        return v.sum(1) if self.opts.target_reduction == "sum" else v.mean(1)

    def target_vectors(self, out: Any, units: List[Tuple[int, int]]) -> Tensor:
        return self.reduce(self.unit_vectors(out, units))

    def per_image(self, g: Tensor) -> Tensor:
        """(N, C, H, W) gradients -> (N, H, W) float64 maps."""
        g = g.double()
        r = self.opts.grad_rectify
        g = F.relu(g) if r == "relu" else g.abs() if r == "abs" else g * g if r == "square" else g
        m = g.sum(1) if self.opts.color_reduction == "sum" else g.mean(1)
        return m.clamp(min=0) if self.opts.map_rectify == "clamp" else m

    def gradients(self, x: Tensor, check: Optional[Tuple[int, Tensor]] = None) -> Tensor:
        """Input gradients of a (B, C, H, W) batch for every unit: (B, U, C, H, W).

        ``check = (b, ref)``: before the backward, image ``b``'s raw channel vectors at the units
        must equal ``ref`` (a plain forward's, :func:`_reference`); raises :class:`_CheckFailed`
        otherwise.
        """
        b, n_u = x.shape[0], len(self.geo.units)
        xr = x.repeat_interleave(n_u, dim=0) if n_u > 1 else x
        xr = xr.detach().requires_grad_(True)
        with torch.enable_grad():
            try:
                out, units = self.forward(xr)
            except (AssertionError, RuntimeError, ValueError) as exc:
                if check is not None:  # an unverified crop or cone: the caller falls back to the full image
                    raise _CropRefused from exc
                raise
            v = self.unit_vectors(out, units)
            if check is not None and (check[1] is None or not _agree(v.detach()[check[0] * n_u : (check[0] + 1) * n_u], check[1])):
                raise _CheckFailed
            (g,) = torch.autograd.grad(self.reduce(v).sum(), xr)
        return g.view(b, n_u, *x.shape[1:])

    def captum_gradients(self, x: Tensor) -> Tensor:
        from captum.attr import NeuronGradient

        ng = NeuronGradient(self.model, self.layer)
        outs = []
        for u in self.geo.units:
            outs.append(ng.attribute(x.detach().clone().requires_grad_(True), neuron_selector=lambda o, u=u: self.target_vectors(o, [u])))
        return torch.stack(outs, 1)


class _CropRefused(Exception):
    """The model raised on a cropped input (e.g. a fixed input size): the crop cannot be used."""


class _CheckFailed(Exception):
    """The first batch's units disagree with the plain reference: the crop or the cone is not exact."""


def _agree(a: Tensor, ref: Tensor) -> bool:
    """Equal to float32 precision (relative to the larger magnitude), and finite."""
    if a.shape != ref.shape or not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(ref).all()):
        return False
    scale = max(float(a.abs().max()), float(ref.abs().max()))
    if scale == 0:  # all-zero vectors (a dead unit) verify nothing: do not accept them as a check
        return False
    return bool((a - ref).abs().max() <= 1e-4 * scale)


def _reference(engine: "_Engine", x0: Tensor, crop: Optional[Tuple[int, int, int, int]], seed: int,
               channels_last: bool = False) -> Optional[Tensor]:
    """The raw channel vectors at the units for image ``x0`` (C, H, W) from a plain forward (no crop
    hooks). Raw, not the rectified target: a unit whose relu'd target is 0 would verify nothing.

    With ``crop``: on a canvas one output stride larger than the crop on every side that fits in
    the image, its pixels outside the crop strong noise. A unit that reads only its field inside the
    crop gives the same value on the crop alone; global pooling, SE, GroupNorm statistics, routing or
    attention over the canvas change it. None when no side has room for such a margin.
    Without ``crop``: on the full image (the reference for cone pruning of the full image).
    One batch-1 forward either way; the compared value comes from the first real batch
    (:meth:`_Engine.gradients` with ``check``), so verification costs no extra crop pass.
    """
    units = list(engine.geo.units)
    canvas = x0
    if crop is not None:
        ya, xa, yb, xb = crop
        h, w = x0.shape[-2:]
        jy, jx = (int(v) for v in engine.geo.jump)
        my, mx = max(jy, 8 // jy * jy), max(jx, 8 // jx * jx)
        pt, pb = (my if ya >= my else 0), (my if yb + my <= h else 0)
        pl, pr = (mx if xa >= mx else 0), (mx if xb + mx <= w else 0)
        if pt + pb + pl + pr == 0:
            return None
        g = torch.Generator().manual_seed(seed)
        canvas = x0[:, ya - pt : yb + pb, xa - pl : xb + pr].clone()
        noise = 3 * torch.randn(canvas.shape, generator=g).to(canvas)
        inside = torch.zeros(canvas.shape, dtype=torch.bool, device=canvas.device)
        inside[:, pt : pt + yb - ya, pl : pl + xb - xa] = True
        canvas = torch.where(inside, canvas, noise)
        units = [(u[0] - (ya - pt) // jy, u[1] - (xa - pl) // jx) for u in units]
    batch = canvas[None]
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        try:
            y = select_output(run_to_layer(engine.model, batch, engine.layer, stop=engine.stop), engine.output_index)
            return engine.unit_vectors(y.expand(len(units), *y.shape[1:]), units)  # sample u targets unit u
        except (IndexError, RuntimeError, ValueError, AssertionError, ErfLabError):  # e.g. a fixed input size
            return None


def _check_locality(engine: "_Engine", x0: Tensor, crop: Tuple[int, int, int, int], seed: int) -> Optional[Tensor]:
    """Stand-alone form of the engine's locality check: the units' channel vectors on ``crop`` alone if they
    equal those on the crop framed by noise (:func:`_reference`), else None."""
    ref = _reference(engine, x0, crop, seed)
    if ref is None:
        return None
    ya, xa, yb, xb = crop
    jy, jx = (int(v) for v in engine.geo.jump)
    units = [(u[0] - ya // jy, u[1] - xa // jx) for u in engine.geo.units]
    with torch.no_grad():
        try:
            y = select_output(run_to_layer(engine.model, x0[None, :, ya:yb, xa:xb], engine.layer), engine.output_index)
            a = engine.unit_vectors(y.expand(len(units), *y.shape[1:]), units)
        except (IndexError, RuntimeError, ValueError, AssertionError, ErfLabError):
            return None
    return a if _agree(a, ref) else None


# Pixels per batch on CPU: activations of about this many input pixels stay cache-friendly
# (ResNet-50-DW, 2 cores: 8 x 224^2 and 2 x 448^2 were the fastest, 1.5x faster than 32 x 224^2 and 8 x 448^2).
CPU_BATCH_PIXELS = 8 * 224 * 224


def auto_batch_size(device: Union[str, torch.device], hw: Tuple[int, int]) -> int:
    """The engine's default batch for images (or crops) of ``hw`` pixels: about
    :data:`CPU_BATCH_PIXELS` pixels per batch on CPU (1 to 64 images), 32 images elsewhere."""
    if torch.device(device).type != "cpu":
        return 32
    return int(min(64, max(1, CPU_BATCH_PIXELS // max(1, hw[0] * hw[1]))))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _model_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first convolution (or first 4-D weight); None when the model does not say."""
    for m in model.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and isinstance(getattr(m, "weight", None), Tensor):
            return c
    for p in model.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None


def _check_input(model: nn.Module, x: Tensor) -> bool:
    """One-line errors for images the model cannot take (channels, a fixed input size); True when the
    model takes one input size only."""
    c = _model_channels(model)
    if c is not None and int(x.shape[1]) != c:
        raise ErfLabError(f"the images have {int(x.shape[1])} channel(s) but the model's first layer takes {c}: "
                          f"convert the images (e.g. open the data with channels={c})")
    return check_input_size(model, (int(x.shape[-2]), int(x.shape[-1])))


def _activation_bytes(model: nn.Module, x: Tensor, layer: Optional[str]) -> int:
    """Bytes of the distinct tensors that modules output in a forward up to ``layer`` for ``x``."""
    seen, total = set(), [0]

    def count(name, mod, out):
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                total[0] += t.numel() * t.element_size()

    with hook_all(model, count) as hooked:
        if not hooked:
            return 0
        with torch.no_grad():
            run_to_layer(model, x, get_layer(model, layer) if layer else None)
    return total[0]


def _plan_layer(model: nn.Module, x_first: Tensor, layer: Optional[str], output_index) -> Tuple[Optional[str], str, int]:
    """(layer, how it was chosen, estimated bytes per image of a forward+backward at the full size).

    The default layer is chosen on a small copy of the image (:func:`erf_lab.layers.probe_size`), not
    at the user's size, and the same probe gives the memory estimate."""
    hw = tuple(x_first.shape[-2:])
    ph, pw = probe_size(model, hw)
    probe = x_first if (ph, pw) == hw else F.interpolate(x_first, size=(ph, pw), mode="bilinear", align_corners=False)
    note = ""
    try:
        if layer in (None, "") and output_index is None:
            chosen = default_layer(model, probe)
            layer, note = chosen.name, f"layer=None: {chosen.note}" if chosen.note else ""
        # images up to the probe's size fit anywhere: no estimate, no extra forward
        act = 0 if (ph, pw) == hw else _activation_bytes(model, probe, layer)
    except ErfLabError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model refused the input: one line, not its traceback
        raise ErfLabError(f"the model does not run on a {ph}x{pw} input ({_first_line(exc)})") from exc
    if act == 0:
        return layer, note, 0
    scale = (hw[0] * hw[1]) / float(ph * pw)
    # forward activations kept for the backward, their gradients, and the input with its gradient
    return layer, note, int(2 * act * scale + 2 * x_first[0].numel() * x_first.element_size())


def check_memory(model: nn.Module, input_size: Sequence[int], layer: Optional[str] = None,
                 device: Union[str, torch.device, None] = None) -> int:
    """Estimated bytes of one image's forward and backward up to ``layer`` at ``input_size`` (C, H, W),
    from a forward on a small probe (no image of the full size is allocated). Raises a one-line
    :class:`ErfLabError` when that does not fit in the memory available on ``device``."""
    c, h, w = (int(v) for v in input_size)
    p = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    ph, pw = probe_size(model, (h, w))
    if (ph, pw) == (h, w):
        return 0
    dtype = _model_dtype(model)
    probe = torch.zeros(1, c, ph, pw, dtype=dtype, device=p.device if p is not None else "cpu")
    try:
        if layer in (None, ""):
            layer = default_layer(model, probe).name
        act = _activation_bytes(model, probe, layer)
    except ErfLabError:
        raise
    except Exception:  # noqa: BLE001 - the model refuses the probe: the engine reports it on the real input
        return 0
    need = int(2 * act * (h * w) / float(ph * pw) + 2 * c * h * w * probe.element_size())
    _images_that_fit(need, device)
    return need


def _available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _images_that_fit(per_image: int, device: torch.device) -> int:
    """How many images a batch may hold in the memory available (a one-line error when not even one)."""
    avail = _available_bytes(device)
    if avail is None or per_image <= 0:
        return 1 << 30
    if per_image > 0.8 * avail:
        raise ErfLabError(f"one image needs about {per_image / 2**30:.1f} GiB for the forward and backward, "
                          f"{avail / 2**30:.1f} GiB are available on {device}: use a smaller image size")
    return max(1, int(0.5 * avail // per_image))


def compute_erf(
    model: nn.Module,
    data: Any,
    *,
    layer: Optional[str] = None,
    unit: Union[str, Sequence[int], Sequence[Sequence[int]]] = "center",
    preset: str = "replknet",
    target_rectify: Optional[str] = _UNSET,
    target_reduction: Optional[str] = _UNSET,
    grad_rectify: Optional[str] = _UNSET,
    color_reduction: Optional[str] = _UNSET,
    map_rectify: Optional[str] = _UNSET,
    normalize: Optional[str] = _UNSET,
    output_index: Union[int, str, None] = None,
    layout: str = "auto",
    prefix_tokens: Optional[int] = None,
    num_images: Optional[int] = None,
    sampling: str = "random",
    seed: int = 0,
    batch_size: Union[int, str] = "auto",
    device: Union[str, torch.device, None] = None,
    image_size: Union[int, Tuple[int, int], None] = None,
    center: str = "rf",
    crop: Union[bool, str] = "auto",
    stop_at_layer: bool = True,
    cone: bool = True,
    channels_last: Union[bool, str] = "auto",
    fold_bn: bool = True,
    backend: str = "engine",
    progress: bool = True,
    distributed: Optional[bool] = None,
) -> Union[ERFResult, List[ERFResult]]:
    """Effective receptive field of ``unit`` of ``layer``, aggregated over ``data``.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W) images; run in eval mode (restored after).
        data: a Tensor[N, C, H, W] / Tensor[C, H, W], a Dataset of dicts with ``"image"``,
            of image tensors or of ``(image, label)`` tuples, or a data spec string
            (``"digits-ms"``, ``"noise"``, a folder...; :func:`erf_lab.data.open_data`, test split).
            Images are used as given (already normalised), resized with bicubic interpolation to
            ``image_size`` if set, in the dtype of the model's parameters (a float64 model gets
            float64 images).
        layer: a name from ``model.named_modules()``; None: the default layer of
            :func:`erf_lab.layers.default_layer` (the last spatial map or token grid of the backbone),
            chosen on a copy of the first image no longer than 256 px.
        unit: ``"center"`` (the cell whose theoretical RF is centred nearest the image centre),
            ``(y, x)``, or a list of such pairs (all in one pass; a list of results is returned).
        preset: ``"replknet"``, ``"luo"`` or ``"openerf"`` (:data:`PRESETS`); the other option
            arguments (:class:`ERFOptions`) override single choices of the preset.
        output_index: element of a tuple/dict layer output.
        layout: ``"auto"`` (detected: :func:`erf_lab.layers.spatial_grid`), ``"nchw"``, ``"nhwc"`` or
            ``"tokens"``; ``prefix_tokens``: class/register tokens before the grid (the model's
            ``num_prefix_tokens``, else guessed, when None).
        num_images, sampling, seed: ``num_images`` images drawn with ``seed``, uniformly
            (``"random"``) or round-robin over labels (``"stratified"``).
        batch_size, device: images per backward pass (``"auto"``: :func:`auto_batch_size` for the
            computed image or crop size) and the device (default: the model's).
        center: ``"rf"`` (metrics centred on the unit's RF centre) or ``"array"`` (RepLKNet parity).
        crop: ``"auto"``: compute only a stride-aligned crop around the unit's field when the
            graph says the unit sees nothing else, verified on the first batch (one image's units
            must equal a plain forward on the crop framed by noise; see :func:`_reference`), with
            the full image as the fallback; False: always the full image.
        stop_at_layer: end the forward at ``layer``.
        cone: with ``crop``, also crop intermediate maps that every path to ``layer`` passes
            through to the unit's cone (verified with the crop on the first batch; see :mod:`erf_lab._cone`).
        channels_last: run in channels-last memory format (model and images; the model's format is
            restored afterwards). ``"auto"``: on CPU for models with 2-D convolutions whose
            parameters are not channels-last already (oneDNN's convolutions and their backward are
            faster there; the map differs only by float rounding).
        fold_bn: fold each eval-mode BatchNorm2d that follows a Conv2d into it for the run (the
            model is restored afterwards; the map differs only by float rounding; see
            :mod:`erf_lab._fold` for the pairs left alone).
        backend: ``"engine"`` or ``"captum"`` (``captum.attr.NeuronGradient``, for cross-checking).
        progress: a progress bar on a terminal, one line when done otherwise (on rank 0; :mod:`erf_lab.progress`).
        distributed: shard images over a torch.distributed group and all-reduce (default: when
            a group is initialised, e.g. under torchrun).

    Returns:
        an :class:`ERFResult` (a list of them for several units).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        >>> r = compute_erf(net, torch.randn(4, 3, 16, 16), progress=False)
        >>> r.map.shape, r.n_images
        ((16, 16), 4)
    """
    if preset not in PRESETS:
        raise ErfLabError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    overrides = {k: v for k, v in dict(
        target_rectify=target_rectify, target_reduction=target_reduction, grad_rectify=grad_rectify,
        color_reduction=color_reduction, map_rectify=map_rectify, normalize=normalize).items() if v is not _UNSET}
    opts = ERFOptions(**{**base.__dict__, **overrides})
    if backend not in ("engine", "captum"):
        raise ErfLabError(f"backend must be 'engine' or 'captum', got {backend!r}")
    if center not in ("rf", "array"):
        raise ErfLabError(f"center must be 'rf' or 'array', got {center!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ErfLabError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
    if isinstance(data, (str, Path)):
        from .data import open_data

        data = open_data(str(data), split="test", seed=seed, image_size=image_size, channels=_model_channels(model) or 3,
                         **({"num_images": num_images} if str(data) == "noise" and num_images else {}))
    t_start = time.perf_counter()
    source = _Source(data)
    indices = _select(source, num_images, sampling, seed)
    use_dist = _dist.is_active() if distributed is None else bool(distributed and _dist.is_active())
    my_indices = indices[_dist.rank_world()[0] :: _dist.rank_world()[1]] if use_dist else indices
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    size = None if image_size is None else ((image_size, image_size) if isinstance(image_size, int) else tuple(image_size))

    dtype = _model_dtype(model)
    first_shape: List[Tuple[int, ...]] = []

    def load(ids: Sequence[int], window: Optional[Tuple[int, int, int, int]] = None) -> Tensor:
        """The images ``ids`` stacked on the device; only ``window`` of each when given."""
        imgs = [source.image(i).to(dtype) for i in ids]
        shapes = {tuple(t.shape) for t in imgs} | ({first_shape[0]} if first_shape else set())
        if size is None and len(shapes) > 1:
            raise ErfLabError(f"images differ in size {sorted(shapes)}; pass image_size to resize them")
        if not first_shape:
            first_shape.append(tuple(imgs[0].shape))
        imgs = [t if size is None or tuple(t.shape[-2:]) == size else
                F.interpolate(t[None], size=size, mode="bicubic", align_corners=False)[0] for t in imgs]
        if window is not None:
            imgs = [t[:, window[0] : window[2], window[1] : window[3]] for t in imgs]
        return torch.stack(imgs).to(device)

    was_training = model.training
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    converted = False
    folding = contextlib.ExitStack()
    try:
        channels_last = resolve_channels_last(channels_last, model, device)
        converted = bool(channels_last) and not any(
            p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
            for p in model.parameters())
        if converted:
            to_channels_last(model)
        x_first = load(indices[:1])
        hw = tuple(x_first.shape[-2:])
        fixed = _check_input(model, x_first)
        layer, layer_note, per_image_bytes = _plan_layer(model, x_first, layer, output_index)
        geo = _geometry(model, layer, output_index, layout, prefix_tokens, unit, x_first[0])
        memory_cap = _images_that_fit(per_image_bytes, device)
        one_at_a_time = static_batch(model)  # a torch.export program with a static batch of 1
        if one_at_a_time and len(geo.units) > 1:
            raise ErfLabError("a torch.export program with a static batch of 1 takes one unit per run; "
                              "re-export it with a dynamic batch dimension for several units")
        if fixed:
            crop = False  # a crop is an input of another size, which a fixed-size model refuses
        n_folded = 0
        if backend == "engine" and fold_bn:
            from ._fold import fold_batchnorm

            n_folded = folding.enter_context(fold_batchnorm(model, geo.graph, layer))
        engine = _Engine(model, layer, output_index, geo, opts, stop_at_layer)
        window = None
        locality = "not needed" if backend == "engine" else "captum backend: full image"
        if backend == "engine" and crop and geo.layout == "nchw":
            window = _crop_window(geo, hw)
            if window is None:
                locality = "field covers the image" if geo.local else "not provably local: " + (geo.rf_note or "graph has global or unbounded dependence")
        cone_note, plan = "off", []
        if backend == "engine" and crop and cone and geo.local and geo.graph is not None and stop_at_layer:
            from ._cone import ConeCrop, plan_cone

            plan = plan_cone(geo.graph, layer, output_index, geo.rf)
            if plan:
                engine.cone = ConeCrop(model, plan, geo.rf, geo.centers)
        # The graph says the crop / cone are exact; the first batch verifies it before its backward:
        # one image's units (computed with crop and cone, inside the real batch) must equal a plain
        # forward of that image (on the crop framed by noise, see _reference). On a mismatch the cone
        # is dropped, then the crop, and the batch is recomputed; the plain full image needs no check.
        verify = window is not None or engine.cone is not None
        refs: Dict[Any, Tuple[int, Optional[Tensor]]] = {}  # crop window -> (image in the batch, reference)
        n_u = len(geo.units)
        acc = torch.zeros(n_u, *hw, dtype=torch.float64, device=device)
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # used, skipped
        bar = progress_bar(total=len(my_indices), desc="ERF", unit="img", enabled=progress and _dist.is_main())
        def batch_for(window: Optional[Tuple[int, int, int, int]]) -> int:
            if one_at_a_time:
                return 1
            if batch_size != "auto":
                return int(batch_size)
            auto = auto_batch_size(device, (window[2] - window[0], window[3] - window[1]) if window is not None else hw)
            return max(1, min(auto, memory_cap))

        pos, batch_used = 0, 0
        t_pass = time.perf_counter()
        while pos < len(my_indices):
            ids = my_indices[pos : pos + batch_for(window)]
            # the first batch keeps whole images: the check needs a margin around the crop, and a fallback the image
            pre_cropped = not verify and window is not None
            if pos == 0 and not pre_cropped and my_indices[:1] == indices[:1]:  # the first image is loaded already
                x_full = x_first if len(ids) == 1 else torch.cat([x_first, load(ids[1:])])
            else:
                x_full = load(ids, window if pre_cropped else None)
            while True:
                engine.origin = (window[0], window[1]) if window is not None else (0, 0)
                x = x_full if window is None or pre_cropped else x_full[:, :, window[0] : window[2], window[1] : window[3]]
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                check = None
                if verify and (window is not None or engine.cone is not None):
                    key = tuple(window) if window is not None else None
                    if key not in refs:  # the first finite image whose units are not all zero (at most 3 tried)
                        refs[key] = (0, None)
                        finite = (i for i in range(x_full.shape[0]) if bool(torch.isfinite(x_full[i]).all()))
                        for _, i in zip(range(3), finite):
                            ref = _reference(engine, x_full[i], window, seed, channels_last)
                            refs[key] = (i, ref)
                            if ref is None or bool(ref.abs().max() > 0):
                                break
                    if refs[key][1] is None and window is not None:
                        window, locality = None, "crop not verifiable (no room for a noise margin, or no finite image): full image"
                        x_full = x_full[: batch_for(window)]  # whole images from now on: an auto batch may shrink
                        continue
                    check = refs[key]
                try:
                    g = engine.gradients(x, check) if backend == "engine" else engine.captum_gradients(x)
                except _CropRefused:
                    window, locality = None, "the model refused the crop: full image"
                    engine.cone, cone_note = None, "off (the model refused the crop)"
                    x_full = x_full[: batch_for(window)]
                    continue
                except _CheckFailed:
                    if engine.cone is not None:  # the cone first: the crop alone may still be exact
                        engine.cone, cone_note = None, "cone check failed: off"
                    else:
                        window, locality = None, "empirical locality check failed: full image"
                        cone_note = "off (the locality check failed)" if plan else cone_note
                        x_full = x_full[: batch_for(window)]
                    continue
                if verify:
                    verify = False
                    if window is not None:
                        locality = "verified (graph, and the first image's units equal a plain forward on the crop framed by noise)"
                    if engine.cone is not None:
                        cone_note = f"{len(plan)} layers cropped to the unit's cone (verified)"
                break
            b = g.shape[0]
            maps = engine.per_image(g.flatten(0, 1)).view(b, n_u, *g.shape[-2:])
            ok = torch.isfinite(maps).flatten(2).all(2).all(1)  # (B,)
            maps = torch.where(ok.view(b, 1, 1, 1), maps, torch.zeros((), dtype=maps.dtype, device=device))
            if window is not None:
                acc[:, window[0] : window[2], window[1] : window[3]] += maps.sum(0)
            else:
                acc += maps.sum(0)
            counts[0] += ok.sum()
            counts[1] += (~ok).sum()
            pos += b
            batch_used = max(batch_used, b)
            bar.update(b)
        bar.close()
        t_done = time.perf_counter()
        if use_dist:
            _dist.all_reduce_sum(acc)
            _dist.all_reduce_sum(counts)
    finally:
        folding.close()
        if converted:
            model.to(memory_format=torch.contiguous_format)
        for n, p in model.named_parameters():
            p.requires_grad_(grads_before.get(n, True))
        model.train(was_training)
    used, skipped = int(counts[0]), int(counts[1])
    if used == 0:
        raise ErfLabError(f"no image gave a finite map: all {skipped} gradients hold NaN or inf "
                          "(check the model's weights and the input normalisation)")
    mean = (acc / used).cpu().numpy()
    results = []
    for k, (u, c) in enumerate(zip(geo.units, geo.centers)):
        meta = {
            "preset": preset,
            "options": dict(opts.__dict__),
            "layer": layer or "",
            "layer_note": layer_note,
            "output_index": output_index,
            "layout": geo.layout,
            "grid": list(geo.grid),
            "prefix_tokens": geo.prefix,
            "unit": list(u),
            "rf_center": [c[0], c[1]],
            "rf_size": None if geo.rf_size is None else [geo.rf_size[0], geo.rf_size[1]],
            "rf_stride": list(geo.jump),
            "rf_note": geo.rf_note,
            "center_mode": center,
            "image_size": list(hw),
            "num_images_requested": num_images,
            "num_images_available": len(source),
            "sampling": sampling,
            "seed": seed,
            "batch_size": batch_size,
            "batch_size_used": batch_used,
            "device": str(device),
            "backend": backend,
            "crop": list(window) if window is not None else None,
            "locality": locality,
            "cone": cone_note,
            "channels_last": bool(channels_last),
            "bn_folded": n_folded,
            "dtype": str(dtype).replace("torch.", ""),
            "world_size": _dist.rank_world()[1] if use_dist else 1,
            "versions": versions(),
            # preparation (default layer, geometry, BN folding) and the batched passes (incl. the check)
            "seconds": {"prepare": t_pass - t_start, "passes": t_done - t_pass},
        }
        results.append(ERFResult(mean[k], used, skipped, meta))
    return results[0] if isinstance(unit, str) or (unit and not isinstance(list(unit)[0], (tuple, list))) else results


def instance_erf(model: nn.Module, image: Tensor, *, display_image: Optional[np.ndarray] = None, **kwargs) -> ERFResult:
    """ERF of one image (C, H, W); ``display_image`` (H x W x C in [0, 1]) is kept for the overlay."""
    r = compute_erf(model, image[None] if image.dim() == 3 else image, progress=False, **kwargs)
    r.image = display_image
    r.meta["instance"] = True
    return r
