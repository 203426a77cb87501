"""Where the ERF is read and what it can see: the layer's grid and layout, the units and their
theoretical-RF centres (from the traced graph, else the even tiling of the image), the model's
input dtype and channels, and the stride-aligned crop window that holds every unit's field."""
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ErfLabError
from ..layers import LayerGrid, check_input_size, get_layer, output_grid, run_to_layer, select_output, spatial_grid

__all__ = ["Geometry", "geometry", "model_dtype", "model_channels", "check_input", "crop_window"]


@dataclass
class Geometry:
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


def geometry(model, layer, output_index, layout, prefix_tokens, units_arg, x0: Tensor, traced: Any = None) -> Geometry:
    """Layer grid, units and their RF centres (theoretical RF when the graph can be traced).
    ``traced``: the model's :class:`~erf_lab.rf.RFGraph` for this input size, or the
    :class:`ErfLabError` tracing it raised, when the caller traced it already (several layers)."""
    from ..rf import trace_rf

    c, h, w = x0.shape
    get_layer(model, layer)  # a clear error for a wrong name before anything runs
    rf, note, graph = None, "", None
    if layout in ("auto", "nchw"):
        try:
            if isinstance(traced, ErfLabError):
                raise traced
            graph = traced if traced is not None else trace_rf(model, (c, h, w))
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
    return Geometry(layout, grid, prefix, units, centers, size, local, note, (jy, jx), graph, rf)


def model_dtype(model: nn.Module) -> torch.dtype:
    """Images are fed in the dtype of the model's first floating parameter (or buffer): a float64
    model is analysed in float64. Default dtype when the model holds no floating tensor."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def crop_window(geo: Geometry, hw: Tuple[int, int]) -> Optional[Tuple[int, int, int, int]]:
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


def model_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first convolution (or first 4-D weight); None when the model does not say."""
    for m in model.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and isinstance(getattr(m, "weight", None), Tensor):
            return c
    for p in model.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None


def check_input(model: nn.Module, x: Tensor) -> bool:
    """One-line errors for images the model cannot take (channels, a fixed input size); True when the
    model takes one input size only."""
    c = model_channels(model)
    if c is not None and int(x.shape[1]) != c:
        raise ErfLabError(f"the images have {int(x.shape[1])} channel(s) but the model's first layer takes {c}: "
                          f"convert the images (e.g. open the data with channels={c})")
    return check_input_size(model, (int(x.shape[-2]), int(x.shape[-1])))
