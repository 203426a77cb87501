"""Layers: find one by name, run a model up to it and read its output, decide which layer to
analyse and how its output is laid out. The one implementation shared by the ERF engine, its
captum backend, ``erf-lab layers``, the feature extraction of ``analyses`` and the figures.

Every hook is registered in a ``with`` block and removed in its ``finally``: no hook survives
an error in the forward.

A layer output is a *spatial grid* when it is

* ``(N, C, H', W')`` (NCHW) or ``(N, H', W', C)`` (NHWC, e.g. timm's Swin) whose two grid axes
  have the image's proportions (one common stride, up to rounding): an attention internal such
  as ``(N, heads, tokens, head_dim)`` is not;
* or ``(N, L, C)`` tokens: ``L = prefix + H' W'`` with ``H'/W'`` the image's aspect ratio, the
  prefix (class, register, distillation tokens) read from the model (``num_prefix_tokens``) or
  else the smallest count that makes a grid.

The *default layer* (``layer=None``) is what a user means by "the features": the last spatial
grid of the backbone. Where the model has ``forward_features`` (timm, this project's zoo) it is
the module whose output that method returns (OpenERF's choice), else the last module, in
execution order, with a spatial grid larger than 1x1 (a classifier's last stage: the pooled
vector and the logits come after it). A model whose own output is a spatial grid (a dense
predictor) is analysed at its output.
"""
import difflib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .errors import ErfLabError

__all__ = ["get_layer", "run_to_layer", "run_to_layers", "stage_layers", "spatial_depth", "select_output", "unit_activation", "hook_all", "LAYOUTS", "LayerGrid", "DefaultLayer", "spatial_grid", "output_grid", "to_nchw", "default_layer",
           "expected_input_size", "probe_size", "output_module", "check_input_size", "static_batch"]

# ---- finding a layer, running to it, reading its output -------------------------------------
Index = Union[int, str, None]


class _Stop(Exception):
    """Raised by the capture hook to end the forward once the target layer has run."""


def get_layer(model: nn.Module, name: Optional[str]) -> nn.Module:
    """The module called ``name`` in ``model.named_modules()`` (the model itself for None or "")."""
    if name in (None, ""):
        return model
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `erf-lab layers`"
        raise ErfLabError(f"the model has no layer named {name!r}{hint}")
    return modules[name]


def select_output(out: Any, index: Index = None) -> Tensor:
    """A tensor from a layer output: itself, element ``index`` of a tuple/list, or key ``index`` of a dict."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        i = 0 if index is None else int(index)
        if not -len(out) <= i < len(out):
            raise ErfLabError(f"layer output has {len(out)} elements; output_index {i} (--output-index) is out of range")
        return select_output(out[i])
    if isinstance(out, dict):
        if index is None:
            index = next(iter(out))
        if index not in out:
            raise ErfLabError(f"layer output has keys {list(out)}; no key {index!r}")
        return select_output(out[index])
    if hasattr(out, "last_hidden_state"):  # HF-style output objects
        return out.last_hidden_state
    raise ErfLabError(f"layer output of type {type(out).__name__} holds no tensor")


@contextmanager
def _capture(layer: nn.Module, stop: bool) -> Iterator[List[Any]]:
    box: List[Any] = []

    def hook(module, inputs, output):
        box.append(output)
        if stop:
            raise _Stop

    try:
        handle = layer.register_forward_hook(hook)
    except (RuntimeError, AttributeError) as exc:  # ScriptModules take no Python hooks
        raise ErfLabError(
            f"cannot hook layer {type(layer).__name__} ({exc}); for TorchScript models only the model output "
            "(no --layer) is supported"
        ) from exc
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def hook_all(model: nn.Module, fn) -> Iterator[bool]:
    """``fn(name, module, output)`` after every named submodule's forward inside the block, the hooks
    removed on exit (also on an error). Yields False when the model takes no Python hooks
    (TorchScript); then nothing is hooked."""
    handles = []
    try:
        for name, m in model.named_modules():
            if not name:
                continue
            try:
                handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, mod, out)))
            except (RuntimeError, AttributeError):  # ScriptModules take no Python hooks
                for h in handles:
                    h.remove()
                handles = []
                yield False
                return
        yield True
    finally:
        for h in handles:
            h.remove()


def run_to_layer(model: nn.Module, x: Tensor, layer: Optional[nn.Module], stop: bool = True) -> Any:
    """Runs ``model(x)`` and returns ``layer``'s output; with ``stop`` the forward ends there."""
    if layer is None or layer is model:
        return model(x)
    with _capture(layer, stop) as box:
        try:
            model(x)
        except _Stop:
            pass
    if not box:
        raise ErfLabError(f"layer {type(layer).__name__} did not run in the model's forward")
    return box[0]


def run_to_layers(model: nn.Module, x: Tensor, layers: Sequence[nn.Module], stop: bool = True) -> List[Any]:
    """Runs ``model(x)`` once and returns the output of each of ``layers`` (in the order given); with
    ``stop`` the forward ends as soon as every one of them has run."""
    box: Dict[int, Any] = {}
    wanted = {id(m) for m in layers}

    def hook(module, inputs, output):
        box.setdefault(id(module), output)
        if stop and len(box) == len(wanted):
            raise _Stop

    handles = []
    try:
        for m in {id(m): m for m in layers}.values():
            try:
                handles.append(m.register_forward_hook(hook))
            except (RuntimeError, AttributeError) as exc:  # ScriptModules take no Python hooks
                raise ErfLabError(f"cannot hook layer {type(m).__name__} ({exc}); for TorchScript models only "
                                  "the model output (no --layer) is supported") from exc
        try:
            model(x)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [type(m).__name__ for m in layers if id(m) not in box]
    if missing:
        raise ErfLabError(f"layer {missing[0]} did not run in the model's forward")
    return [box[id(m)] for m in layers]


def unit_activation(y: Tensor, layout: str, units: Sequence[Tuple[int, int]], grid_w: int, prefix: int) -> Tensor:
    """Channel vectors at ``units``: y is (B * U, ...) with sample ``b * U + u`` targeting ``units[u]``.

    Returns (B * U, C).
    """
    n_units = len(units)
    b = y.shape[0] // n_units
    uy = torch.tensor([u[0] for u in units], device=y.device).repeat(b)
    ux = torch.tensor([u[1] for u in units], device=y.device).repeat(b)
    rows = torch.arange(y.shape[0], device=y.device)
    if layout == "nchw":
        return y[rows, :, uy, ux]
    if layout == "nhwc":
        return y[rows, uy, ux, :]
    return y[rows, prefix + uy * grid_w + ux, :]


# ---- which layer, and how its output maps onto the image ------------------------------------
LAYOUTS = ("nchw", "nhwc", "tokens")
MAX_PREFIX_TOKENS = 8


@dataclass(frozen=True)
class LayerGrid:
    """How a layer output maps onto the image: ``layout`` (``nchw``, ``nhwc`` or ``tokens``),
    ``grid`` (H', W') and ``prefix`` tokens before the grid (tokens only)."""

    layout: str
    grid: Tuple[int, int]
    prefix: int = 0

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]


def _proportional(a: int, b: int, image_hw: Tuple[int, int]) -> bool:
    """Whether an (a, b) grid can tile an image with one stride: ``a = H/s + e1``, ``b = W/s + e2``
    with ``|e| <= 1.5`` (rounding of strided convs and padding), i.e. ``|a W - b H| <= 1.5 (H + W)``."""
    h, w = image_hw
    if a < 1 or b < 1 or a > 4 * h or b > 4 * w:  # up to 4x finer than the image (decoders upsample)
        return False
    return abs(a * w - b * h) <= 1.5 * (h + w)


def _model_prefix(model: Optional[nn.Module]) -> Optional[int]:
    n = getattr(model, "num_prefix_tokens", None) if model is not None else None
    return int(n) if isinstance(n, int) and n >= 0 else None


def _model_prefers_nhwc(model: Optional[nn.Module]) -> bool:
    fmt = getattr(model, "output_fmt", None) if model is not None else None
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def _token_grid(n_tokens: int, image_hw: Tuple[int, int], prefix: Optional[int]) -> Optional[LayerGrid]:
    h, w = image_hw
    for p in ([prefix] if prefix is not None else range(0, MAX_PREFIX_TOKENS + 1)):
        n = n_tokens - p
        if n <= 0:
            continue
        gh = round(math.sqrt(n * h / w))
        if gh > 0 and n % gh == 0 and _proportional(gh, n // gh, image_hw) and abs(n // gh / gh - w / h) < 0.5 / gh + 1e-9:
            return LayerGrid("tokens", (gh, n // gh), p)
    return None


def spatial_grid(t: Any, image_hw: Tuple[int, int], model: Optional[nn.Module] = None,
                 prefix_tokens: Optional[int] = None) -> Optional[LayerGrid]:
    """The grid of a layer output (module docstring), or None when it is not a spatial grid."""
    if not isinstance(t, Tensor):
        return None
    if t.dim() == 4:
        nchw = _proportional(int(t.shape[2]), int(t.shape[3]), image_hw)
        nhwc = _proportional(int(t.shape[1]), int(t.shape[2]), image_hw)
        if nhwc and (not nchw or _model_prefers_nhwc(model)):
            return LayerGrid("nhwc", (int(t.shape[1]), int(t.shape[2])))
        if nchw:
            return LayerGrid("nchw", (int(t.shape[2]), int(t.shape[3])))
        return None
    if t.dim() == 3:
        prefix = prefix_tokens if prefix_tokens is not None else _model_prefix(model)
        return _token_grid(int(t.shape[1]), image_hw, prefix)
    return None


def output_grid(y: Tensor, image_hw: Tuple[int, int], layout: str = "auto", prefix_tokens: Optional[int] = None,
                model: Optional[nn.Module] = None) -> LayerGrid:
    """The grid of a layer output in the ``layout`` asked for (``"auto"``: detected).

    Raises:
        ErfLabError: the output is no spatial grid, or does not fit the layout asked for.
    """
    shape = list(y.shape)
    if layout == "auto":
        g = spatial_grid(y, image_hw, model, prefix_tokens)
        if g is None:
            raise ErfLabError(
                f"layer output has shape {shape}, which is not a spatial map (N,C,H,W), (N,H,W,C) or tokens (N,L,C) "
                f"on a grid with the image's proportions: pick another layer, or name its layout if it is one"
            )
        return g
    if layout not in LAYOUTS:
        raise ErfLabError(f"layout must be auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout in ("nchw", "nhwc") and y.dim() != 4:
        raise ErfLabError(f"layout {layout} needs a 4-D layer output, got shape {shape}"
                          + (" (tokens: use layout tokens)" if y.dim() == 3 else ""))
    if layout == "nchw":
        return LayerGrid("nchw", (int(y.shape[2]), int(y.shape[3])))
    if layout == "nhwc":
        return LayerGrid("nhwc", (int(y.shape[1]), int(y.shape[2])))
    if y.dim() != 3:
        raise ErfLabError(f"layout tokens needs a 3-D layer output (N, L, C), got shape {shape}")
    g = _token_grid(int(y.shape[1]), image_hw, prefix_tokens if prefix_tokens is not None else _model_prefix(model))
    if g is None:
        raise ErfLabError(
            f"cannot lay {int(y.shape[1])} tokens on a grid with the image's aspect ratio"
            + ("" if prefix_tokens is not None else "; give the number of prefix tokens")
        )
    return g


def to_nchw(y: Tensor, g: LayerGrid) -> Tensor:
    """A layer output as an (N, C, H', W') map (prefix tokens dropped)."""
    if g.layout == "nchw":
        return y
    if g.layout == "nhwc":
        return y.permute(0, 3, 1, 2)
    return y[:, g.prefix:, :].transpose(1, 2).reshape(y.shape[0], y.shape[2], *g.grid)


@dataclass(frozen=True)
class DefaultLayer:
    """The default layer: ``name`` (None: the model output), its grid and how it was chosen."""

    name: Optional[str]
    grid: LayerGrid
    note: str


def output_module(model: nn.Module, example: Tensor) -> Optional[str]:
    """The last named module (not an Identity, where there is another) whose output is the model's own
    output tensor; None when none is."""
    outputs, out = _record_outputs(model, lambda: model(example))
    same = [(n, m) for n, m, o in outputs if o is out]
    named = [n for n, m in same if not isinstance(m, nn.Identity)] or [n for n, _ in same]
    return named[-1] if named else None


def _record_outputs(model: nn.Module, run) -> Tuple[List[Tuple[str, nn.Module, Any]], Any]:
    """``run()`` with a forward hook on every named module: ((name, module, output) in finishing order, result)."""
    outputs: List[Tuple[str, nn.Module, Any]] = []
    with hook_all(model, lambda name, mod, out: outputs.append((name, mod, out))), torch.no_grad():
        result = run()
    return outputs, result


def default_layer(model: nn.Module, example: Tensor) -> DefaultLayer:
    """The default layer of ``model`` for an ``example`` batch (1, C, H, W) (module docstring has the rule).

    Raises:
        ErfLabError: nothing in the model outputs a spatial grid (one line).
    """
    if example.dim() == 3:
        example = example.unsqueeze(0)
    hw = (int(example.shape[-2]), int(example.shape[-1]))
    if isinstance(model, torch.jit.ScriptModule):
        with torch.no_grad():
            out = model(example)
        g = spatial_grid(out, hw, model) if isinstance(out, Tensor) else None
        if g is None:
            raise ErfLabError(
                "a TorchScript model can only be analysed at its output (its layers take no hooks), and this one "
                f"outputs {list(out.shape) if isinstance(out, Tensor) else type(out).__name__}, not a spatial map: "
                "use the eager checkpoint or a torch.export program to pick a layer")
        return DefaultLayer(None, g, "TorchScript: the model output")
    features = getattr(model, "forward_features", None)
    if callable(features):
        outputs, target = _record_outputs(model, lambda: features(example))
        g = spatial_grid(target, hw, model)
        if g is not None:
            same = [(n, m) for n, m, o in outputs if o is target]
            named = [n for n, m in same if not isinstance(m, nn.Identity)] or [n for n, _ in same]
            if named:
                return DefaultLayer(named[-1], g, f"the module whose output forward_features returns ({named[-1]})")
    else:
        outputs, out = _record_outputs(model, lambda: model(example))
        g = spatial_grid(out, hw, model) if isinstance(out, Tensor) else None
        if g is not None:
            return DefaultLayer(None, g, "")
    grids = [(n, spatial_grid(o, hw, model)) for n, _, o in outputs]
    grids = [(n, g) for n, g in grids if g is not None]
    if not grids:
        raise ErfLabError(f"{type(model).__name__} has no layer with a spatial map or token grid "
                          f"for a {hw[0]}x{hw[1]} input: give a layer")
    larger = [(n, g) for n, g in grids if g.cells > 1]
    name, g = (larger or grids)[-1]
    return DefaultLayer(name, g, f"the last spatial layer ({name}, {g.grid[0]}x{g.grid[1]} {g.layout})")


def expected_input_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The (H, W) input a fixed-size model requires, where it says: timm's ``patch_embed`` with a
    strict image size (ViT, Swin...), torchvision's ViT ``image_size``, a torch.export program's
    static input shape (``input_shape``). None when the model takes any size."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 4 and all(isinstance(v, int) for v in shape[2:]):
        return int(shape[2]), int(shape[3])
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        strict = getattr(pe, "strict_img_size", True) and not getattr(pe, "dynamic_img_size", False)
        if strict:
            s = pe.img_size
            return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and type(model).__name__ == "VisionTransformer":  # torchvision
        return size, size
    return None


def static_batch(model: nn.Module) -> Optional[int]:
    """The batch size a torch.export program was exported with when that dimension is static (its
    ``input_shape``), else None. Only a static batch of 1 can be analysed (one-line error otherwise)."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], int):
        if shape[0] != 1:
            raise ErfLabError(f"the torch.export program takes a static batch of {shape[0]} images; re-export it "
                              "with batch 1 or a dynamic batch dimension (torch.export.Dim)")
        return 1
    return None


def check_input_size(model: nn.Module, hw: Tuple[int, int]) -> bool:
    """One-line error when a fixed-size model (:func:`expected_input_size`) is given another size;
    True when the model takes one size only."""
    want = expected_input_size(model)
    if want is not None and tuple(hw) != tuple(want):
        raise ErfLabError(f"this model takes {want[0]}x{want[1]} inputs only, the images are {hw[0]}x{hw[1]}: "
                          f"use image size {want[0]}" + ("" if want[0] == want[1] else f",{want[1]}"))
    return want is not None


def probe_size(model: nn.Module, hw: Tuple[int, int], longest: int = 256) -> Tuple[int, int]:
    """A small input size for choosing the default layer and estimating memory: ``hw`` itself for a
    fixed-size model or an input no longer than ``longest`` px, else ``hw`` scaled to ``longest`` on its
    long side (a multiple of 32, proportions kept)."""
    if expected_input_size(model) is not None or max(hw) <= longest:
        return hw
    s = longest / max(hw)
    return tuple(max(32, int(round(v * s / 32)) * 32) for v in hw)


# ---- stages and depth: the axes of a growth curve -------------------------------------------
def _kernel(m: nn.Module) -> int:
    """Pixels of a module's spatial window (``kernel_size`` product; 1 for none)."""
    k = getattr(m, "kernel_size", None)
    if k is None:
        return 1
    k = (k, k) if isinstance(k, int) else tuple(k)
    return int(math.prod(int(v) for v in k))


def stage_layers(model: nn.Module, example: Tensor) -> List[DefaultLayer]:
    """Each stage's output, in forward order: the last-spatial-layer rule of :func:`default_layer`
    applied per output grid. Modules are taken at one depth of the module tree (dots in the name):
    the depth whose spatial outputs show the most distinct grids (the shallowest on a tie); for
    each grid, the last module of that depth to finish with it is the stage's output.

    Raises:
        ErfLabError: no layer outputs a spatial map (one line).
    """
    if example.dim() == 3:
        example = example.unsqueeze(0)
    hw = (int(example.shape[-2]), int(example.shape[-1]))
    features = getattr(model, "forward_features", None)
    outputs, _ = _record_outputs(model, lambda: features(example) if callable(features) else model(example))
    spatial = []
    for name, m, out in outputs:
        g = spatial_grid(out, hw, model)
        if g is not None and g.cells > 1 and not isinstance(m, nn.Identity):
            spatial.append((name, g))
    if not spatial:
        raise ErfLabError(f"{type(model).__name__} has no layer with a spatial map or token grid "
                          f"for a {hw[0]}x{hw[1]} input: give the layers")
    best: List[Tuple[str, LayerGrid]] = []
    for depth in sorted({n.count(".") for n, _ in spatial}):
        level = [(n, g) for n, g in spatial if n.count(".") == depth]
        if len({g.grid for _, g in level}) > len({g.grid for _, g in best}):
            best = level
    last: Dict[Tuple[int, int], Tuple[int, str, LayerGrid]] = {}
    for i, (n, g) in enumerate(best):
        last[g.grid] = (i, n, g)
    # a container whose output is its last block's (layer1 for layer1.2) names the stage
    output_of = {n: o for n, _, o in outputs}
    # (in-place ops share a tensor too: of equal depth, the last to finish, which saw every change)
    alias = {n: min(((a.count("."), -i), a) for i, (a, _, o) in enumerate(outputs) if o is output_of[n])[1]
             for _, n, _ in last.values()}
    last = {k: (i, alias[n], g) for k, (i, n, g) in last.items()}
    return [DefaultLayer(n, g, f"the output of stage {k + 1} ({n}, {g.grid[0]}x{g.grid[1]} {g.layout})")
            for k, (_, n, g) in enumerate(sorted(last.values(), key=lambda t: t[0]))]


def spatial_depth(model: nn.Module, example: Tensor, layers: Sequence[Optional[str]]) -> Dict[Optional[str], int]:
    """How many spatial windows (modules with a kernel larger than 1x1, the outermost where they
    nest) run in a forward of ``example`` up to the end of each of ``layers``: the depth a growth
    curve plots ERF size against (None: the model output)."""
    if example.dim() == 3:
        example = example.unsqueeze(0)
    names = [n for n, m in model.named_modules() if n and _kernel(m) > 1]
    outer = {n for n in names if not any(n.startswith(a + ".") for a in names)}
    count, depth = [0], {}
    wanted = set(layers)

    def record(name, mod, out):
        if name in outer:
            count[0] += 1
        if name in wanted:
            depth[name] = count[0]

    with hook_all(model, record), torch.no_grad():
        model(example)
    if None in wanted or "" in wanted:
        depth[None] = depth[""] = count[0]
    return {layer: depth.get(layer, 0) for layer in layers}
