"""Theoretical receptive fields (TRF) of every layer of a network, for arbitrary graphs.

The model is traced with :mod:`torch.fx` (every ``torch.nn`` layer and every ``dk_ops``
module is one leaf), shapes are propagated with a dummy input, and the receptive field
is pushed through the graph node by node, so residual branches, concatenations and
other merges are handled by the graph rather than by execution order. Per axis a
tensor's field is ``(size, jump, centre of unit 0)`` in input pixels (pixel centres at
integer coordinates, the image spanning ``[-0.5, H - 0.5]``):

* a window op (conv, pooling, DK) with kernel ``k``, stride ``s``, padding ``p`` and
  dilation ``d``: ``size += (k - 1) d jump``, ``centre += ((k - 1) d / 2 - p) jump``,
  ``jump *= s``;
* a merge (``+``, ``*``, ``cat``): the union of the inputs' fields, with an alignment
  check (equal jumps and centres); a misaligned merge is reported, not hidden;
* DK layers (``DeformKernel2d``, ``GlobalDeformKernel2d``) act as a ``k x k`` window:
  kernel offsets move where the *kernel* is sampled, never where the *image* is read;
* DCN layers (``DeformConv2d``) read the image at learnt offsets: unbounded, or widened by
  ``ceil(offset_clip)`` pixels per side when clipped; ``DeformKernelConv2d`` likewise;
* global pooling, ``Linear`` after a flatten, attention, routing of CondConv and global DK
  (global average pool) make the output depend on the whole image: ``global = True``.

Graphs of aten ops (a ``torch.export`` program loaded as :class:`erf_lab.checkpoint.ExportedModule`,
whose unflattened submodules run ``torch.ops.aten.*``) follow the same rules op by op (conv,
pooling, padding, reductions, norms, linear/attention, ``dk_ops::deform_kernel_conv2d``); an op
without a rule that changes the grid is reported (``global``, with a note), never taken as 1x1.
"""
import itertools
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import ErfLabError

__all__ = ["AxisRF", "LayerRF", "RFGraph", "theoretical_rf", "trace_rf"]

INF = float("inf")


@dataclass(frozen=True)
class AxisRF:
    """Receptive field along one axis: ``size`` and ``jump`` in input pixels, ``center0`` of unit 0."""

    size: float = 1.0
    jump: float = 1.0
    center0: float = 0.0

    def center(self, i: float) -> float:
        return self.center0 + i * self.jump

    def window(self, k: int, s: int, p: int, d: int = 1) -> "AxisRF":
        return AxisRF(self.size + (k - 1) * d * self.jump, self.jump * s, self.center0 + ((k - 1) * d / 2 - p) * self.jump)


@dataclass(frozen=True)
class LayerRF:
    """Receptive field of one tensor of the traced graph (both axes plus flags)."""

    y: AxisRF = AxisRF()
    x: AxisRF = AxisRF()
    shape: Optional[Tuple[int, ...]] = None  # (C, H, W) for spatial tensors
    global_: bool = False  # depends on the whole image (global pooling, routing, attention...)
    aligned: bool = True
    notes: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def unbounded(self) -> bool:
        return math.isinf(self.y.size) or math.isinf(self.x.size)

    @property
    def spatial(self) -> bool:
        return self.shape is not None and len(self.shape) == 3

    def center(self, unit: Tuple[float, float]) -> Tuple[float, float]:
        """Input-pixel centre of the field of output cell ``unit = (i, j)``."""
        return self.y.center(unit[0]), self.x.center(unit[1])

    def box(self, unit: Tuple[float, float]) -> Tuple[float, float, float, float]:
        """``(y0, x0, y1, x1)``: the first and last input pixel of the field of ``unit`` (inclusive)."""
        cy, cx = self.center(unit)
        hy, hx = (self.y.size - 1) / 2, (self.x.size - 1) / 2
        return cy - hy, cx - hx, cy + hy, cx + hx

    def local(self) -> bool:
        """True when a unit provably reads only its bounded field (the crop optimisation's condition)."""
        return self.spatial and not self.global_ and not self.unbounded and self.aligned


def _leaf_types() -> Tuple[type, ...]:
    try:
        from dk_ops import modules as dkm

        return (dkm.GlobalDeformKernel2d, dkm.DeformKernel2d, dkm.DeformKernelConv2d, dkm.DeformConv2d, dkm.CondConv2d)
    except Exception:  # pragma: no cover - dk_ops always ships with erf_lab
        return ()


class _Tracer(fx.Tracer):
    """Traces with ``dk_ops`` modules as leaves and records every module's output node."""

    def __init__(self) -> None:
        super().__init__()
        self.leaves = _leaf_types()
        self.module_outputs: Dict[str, Any] = {}
        self.module_calls: Dict[str, int] = {}  # a module called twice (a shared ReLU) has no single output

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        self.module_outputs[name] = out
        self.module_calls[name] = self.module_calls.get(name, 0) + 1
        return out


def _pair(v: Any) -> Tuple[int, int]:
    return (v, v) if isinstance(v, (int, float)) else (v[0], v[1])


def _window(rf: LayerRF, k, s, p, d=1) -> LayerRF:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(s), _pair(p), _pair(d)
    return replace(rf, y=rf.y.window(kh, sh, ph, dh), x=rf.x.window(kw, sw, pw, dw))


def _union(rfs: Sequence[LayerRF]) -> LayerRF:
    rfs = [r for r in rfs if r is not None]
    spatial = [r for r in rfs if r.spatial and r.shape[1:] != (1, 1)]
    glob = any(r.global_ for r in rfs) or any(not r.spatial or r.shape[1:] == (1, 1) for r in rfs)
    if not spatial:
        return replace(rfs[0], global_=True)
    notes: List[str] = sum((list(r.notes) for r in rfs), [])
    aligned = all(r.aligned for r in rfs)

    def axis(axes: List[AxisRF]) -> Tuple[AxisRF, bool]:
        lo = min(a.center0 - (a.size - 1) / 2 for a in axes)
        hi = max(a.center0 + (a.size - 1) / 2 for a in axes)
        same = all(a.jump == axes[0].jump and a.center0 == axes[0].center0 for a in axes)
        if any(math.isinf(a.size) for a in axes):
            return AxisRF(INF, axes[0].jump, axes[0].center0), same
        return AxisRF(hi - lo + 1, max(a.jump for a in axes), (lo + hi) / 2), same

    ay, oky = axis([r.y for r in spatial])
    ax, okx = axis([r.x for r in spatial])
    if not (oky and okx):
        aligned = False
        notes.append("merge of misaligned fields")
    return LayerRF(ay, ax, spatial[0].shape, glob, aligned, tuple(dict.fromkeys(notes)))


def _as_global(rf: LayerRF, note: str) -> LayerRF:
    return replace(rf, global_=True, notes=tuple(dict.fromkeys(rf.notes + (note,))))


_WINDOW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_POOL_FUNCS = {F.max_pool2d, torch.max_pool2d, F.avg_pool2d, torch._C._nn.avg_pool2d}
_CONV_FUNCS = {F.conv2d, torch.conv2d}
_ADAPTIVE_FUNCS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch._C._nn.adaptive_avg_pool2d}


def _adaptive(rf: LayerRF, in_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> LayerRF:
    if tuple(out_hw) == (1, 1):
        return _as_global(rf, "global pooling")
    out = rf
    for axis, n_in, n_out in (("y", in_hw[0], out_hw[0]), ("x", in_hw[1], out_hw[1])):
        a: AxisRF = getattr(out, axis)
        if n_in % n_out == 0:
            k = n_in // n_out
            a = a.window(k, k, 0)
        else:  # uneven windows: report the widest one and flag the irregular grid
            k = max(math.ceil((i + 1) * n_in / n_out) - (i * n_in) // n_out for i in range(n_out))
            a = AxisRF(a.size + (k - 1) * a.jump, a.jump * n_in / n_out, a.center0 + (k - 1) / 2 * a.jump)
            out = replace(out, aligned=False, notes=out.notes + ("adaptive pooling with uneven windows",))
        out = replace(out, **{axis: a})
    return out


def _pad(rf: LayerRF, padding) -> LayerRF:
    """Explicit padding (left, right, top, bottom): unit 0 moves up/left by the leading pad."""
    left, _, top, _ = (padding,) * 4 if isinstance(padding, int) else tuple(padding) + (0,) * (4 - len(padding))
    return replace(rf, y=replace(rf.y, center0=rf.y.center0 - top * rf.y.jump),
                   x=replace(rf.x, center0=rf.x.center0 - left * rf.x.jump))


def _op_name(target: Any) -> str:
    """``"aten::conv2d"`` for an ``OpOverload`` (``torch.ops.aten.conv2d.default``), else ""."""
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None and isinstance(getattr(schema, "name", None), str) else ""


def _op_args(node: fx.Node) -> Dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    out: Dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _pair2(v: Any) -> Tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return (v, v)


def _out_hw(node: fx.Node) -> Optional[Tuple[int, int]]:
    """(H, W) of a node's (first) 4-D output, tuple outputs included (``max_pool2d_with_indices``)."""
    meta = node.meta.get("tensor_meta")
    if not hasattr(meta, "shape") and isinstance(meta, (tuple, list)) and meta:  # TensorMetadata is a tuple too
        meta = meta[0]
    shape = tuple(getattr(meta, "shape", ()))
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else None


_OP_CONVS = {"aten::conv2d", "aten::convolution", "aten::_convolution", "aten::cudnn_convolution",
             "aten::mkldnn_convolution", "aten::_conv_depthwise2d"}
_OP_POOLS = {"aten::max_pool2d", "aten::max_pool2d_with_indices", "aten::avg_pool2d", "aten::mkldnn_max_pool2d"}
_OP_ADAPTIVE = {"aten::adaptive_avg_pool2d", "aten::_adaptive_avg_pool2d", "aten::adaptive_max_pool2d"}
_OP_PADS = {"aten::pad", "aten::constant_pad_nd", "aten::reflection_pad2d", "aten::replication_pad2d",
            "aten::_pad_circular"}
_OP_REDUCTIONS = {"aten::mean", "aten::sum", "aten::amax", "aten::amin", "aten::max", "aten::min", "aten::std",
                  "aten::var", "aten::logsumexp", "aten::prod", "aten::norm", "aten::linalg_vector_norm",
                  "aten::std_mean", "aten::var_mean", "aten::nansum", "aten::nanmean"}
_OP_BATCH_NORMS = {"aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit",
                   "aten::_native_batch_norm_legit_functional", "aten::cudnn_batch_norm", "aten::miopen_batch_norm"}
_OP_MIXING = {
    "aten::linear": "linear", "aten::addmm": "linear", "aten::mm": "linear",
    "aten::matmul": "matmul", "aten::bmm": "matmul", "aten::baddbmm": "matmul",
    "aten::scaled_dot_product_attention": "attention", "aten::_scaled_dot_product_flash_attention": "attention",
    "aten::_scaled_dot_product_efficient_attention": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::_native_multi_head_attention": "attention",
}


def _op_rule(node: fx.Node, rf_of: Dict[fx.Node, Optional[LayerRF]], first: LayerRF, in_hw,
             out_hw) -> Tuple[LayerRF, bool]:
    """(field after the aten / dk_ops op call ``node``, handled?): the op twins of the module and
    ``F.*`` rules, for graphs of ops (unflattened ``torch.export`` programs). Unhandled ops fall
    back to the generic rules (merge, pointwise when the grid is kept, else reported)."""
    name = _op_name(node.target)
    a = _op_args(node)

    def field(key: str) -> Optional[LayerRF]:
        v = a.get(key)
        return rf_of.get(v) if isinstance(v, fx.Node) else None

    def others(*keys: str) -> List[LayerRF]:  # image-dependent fields of the op's other tensor arguments
        return [r for r in (field(k) for k in keys) if r is not None]

    arg0 = a.get(next(iter(a), ""))  # the op's (first) input
    src = (rf_of.get(arg0) if isinstance(arg0, fx.Node) else None) or first
    src_hw = src.shape[1:] if src.spatial else in_hw
    if name in _OP_CONVS:
        w = _spatial_shape(a["weight"]) if isinstance(a.get("weight"), fx.Node) else None
        if w is None or a.get("transposed"):
            return _as_global(src, f"{name[6:]}: {'transposed ' if w else 'non-2-D '}convolution not modelled"), True
        k, d = w[1:], _pair2(a.get("dilation", 1))
        pad = a.get("padding", 0)
        if isinstance(pad, str):
            pad = tuple(d[i] * (k[i] - 1) // 2 for i in range(2)) if pad == "same" else (0, 0)
        out = _window(src, k, _pair2(a.get("stride", 1)), _pair2(pad), d)
        if others("weight", "bias"):
            out = _as_global(out, "convolution weights computed from the input (dynamic routing)")
        return out, True
    if name in _OP_POOLS:
        k = _pair2(a["kernel_size"])
        s = a.get("stride") or k
        return _window(src, k, _pair2(s), _pair2(a.get("padding", 0)), _pair2(a.get("dilation", 1))), True
    if name in _OP_ADAPTIVE:
        hw = _out_hw(node)
        return (_adaptive(src, src_hw, hw), True) if hw is not None and src_hw is not None else (src, False)
    if name in _OP_PADS:
        pads = a.get("pad", a.get("padding"))
        if (isinstance(pads, (list, tuple)) and len(pads) >= 2 and len(pads) % 2 == 0
                and all(isinstance(v, int) for v in pads)):
            return _pad(src, tuple(pads[:4])), True
        return src, False
    if name == "dk_ops::deform_kernel_conv2d":
        out = _window(src, (a["kernel_h"], a["kernel_w"]), (a["stride_h"], a["stride_w"]), (a["pad_h"], a["pad_w"]),
                      (a["dilation_h"], a["dilation_w"]))
        if isinstance(a.get("offset"), fx.Node):  # image offsets (DCN): reads anywhere
            out = replace(out, y=replace(out.y, size=INF), x=replace(out.x, size=INF),
                          notes=out.notes + ("deform_kernel_conv2d: image offsets unbounded",))
        # Kernel offsets / mask / weights computed from the image: local ones (DK's offset conv has the
        # layer's own window) keep the field, globally routed ones (DK global) make it global.
        extra = others("kernel_offset", "offset", "mask", "weight", "bias")
        return (_union([out] + extra) if extra else out), True
    if name in _OP_REDUCTIONS:
        rank = len(getattr(arg0.meta.get("tensor_meta"), "shape", ())) if isinstance(arg0, fx.Node) else 0
        schema_args = node.target._schema.arguments
        if any(x.name == "dim" for x in schema_args):
            dims = a.get("dim")
        elif sum(str(x.type).startswith("Tensor") for x in schema_args) == 1:
            dims = None  # a full reduction (mean.default, max.default)
        else:
            return src, False  # max.other & co. are elementwise
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        axes = {d % rank for d in dims if isinstance(d, int)} if rank else set()
        if not dims or (rank == 4 and {2, 3} <= axes):
            return _as_global(src, "global pooling"), True
        if rank == 4 and axes & {2, 3}:
            return _as_global(src, f"{name[6:]} over a spatial axis"), True
        return src, False
    if name in _OP_BATCH_NORMS:
        if a.get("training") is True:
            return _as_global(src, "batch_norm with batch statistics (exported in training mode)"), True
        return src, False
    if name == "aten::instance_norm" and a.get("use_input_stats", True):
        return _as_global(src, "instance_norm normalises with per-image statistics"), True
    if name in ("aten::group_norm", "aten::native_group_norm"):
        return _as_global(src, f"{name[6:]} normalises with statistics over the whole map"), True
    if name in ("aten::layer_norm", "aten::native_layer_norm"):
        shape = a.get("normalized_shape") or []
        if src.spatial and src_hw is not None and len(shape) >= 1 and shape[-1] == src_hw[1]:
            return _as_global(src, f"{name[6:]} normalises with statistics over the spatial axes"), True
        return src, False
    if name in _OP_MIXING:
        return _as_global(src, f"{_OP_MIXING[name]} mixes all positions"), True
    return src, False


def _target_name(target: Any) -> str:
    """A readable op name for notes: ``flatten`` for ``aten.flatten.using_ints``, ``dk_ops::x`` for custom ops."""
    name = _op_name(target)
    if name:
        return name[6:] if name.startswith("aten::") else name
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _module_rule(m: nn.Module, rf: LayerRF, in_hw, out_hw) -> Tuple[LayerRF, bool]:
    """(field after module ``m``, handled?)."""
    from dk_ops import modules as dkm

    if isinstance(m, (dkm.DeformConv2d, dkm.DeformKernelConv2d)):
        out = _window(rf, m.kernel_size, m.stride, m.padding, m.dilation)
        clip = getattr(m, "offset_clip", None) if isinstance(m, dkm.DeformConv2d) else None
        if clip is None:
            y, x = replace(out.y, size=INF), replace(out.x, size=INF)
            note = f"{type(m).__name__}: image offsets unbounded"
        else:
            c = math.ceil(clip)
            y, x = replace(out.y, size=out.y.size + 2 * c * rf.y.jump), replace(out.x, size=out.x.size + 2 * c * rf.x.jump)
            note = f"DeformConv2d: offsets clipped to {clip} px"
        return replace(out, y=y, x=x, notes=out.notes + (note,)), True
    if isinstance(m, (dkm.GlobalDeformKernel2d, dkm.CondConv2d)):
        out = _window(rf, m.kernel_size, m.stride, m.padding, m.dilation)
        return _as_global(out, f"{type(m).__name__}: routing by global pooling"), True
    if isinstance(m, dkm.DeformKernel2d):
        return _window(rf, m.kernel_size, m.stride, m.padding, m.dilation), True
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str):  # "same" / "valid"
            k, d = _pair(m.kernel_size), _pair(m.dilation)
            pad = tuple(d[i] * (k[i] - 1) // 2 for i in range(2)) if m.padding == "same" else (0, 0)
            return _window(rf, m.kernel_size, m.stride, pad, m.dilation), True
        return _window(rf, m.kernel_size, m.stride, m.padding, m.dilation), True
    if isinstance(m, nn.MaxPool2d):
        return _window(rf, m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation), True
    if isinstance(m, nn.AvgPool2d):
        return _window(rf, m.kernel_size, m.stride or m.kernel_size, m.padding), True
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and out_hw is not None:
        return _adaptive(rf, in_hw, out_hw), True
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        return _pad(rf, m.padding), True
    if isinstance(m, (nn.Linear, nn.MultiheadAttention)) or "Attention" in type(m).__name__:
        return _as_global(rf, f"{type(m).__name__} mixes all positions"), True
    stats = _statistics_norm(m, rf, in_hw)
    if stats:
        return _as_global(rf, f"{type(m).__name__} normalises with {stats}"), True
    return rf, False


def _statistics_norm(m: nn.Module, rf: LayerRF, in_hw) -> str:
    """What a normalisation layer takes its statistics over, when that spans positions
    (every output then depends on the whole map); "" for a pointwise one (eval mode)."""
    if isinstance(m, nn.GroupNorm):
        return "statistics over the whole map"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats:
        return "per-image statistics"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
        return "batch statistics (no running statistics)"
    if (isinstance(m, nn.LayerNorm) and rf.spatial and in_hw is not None and len(m.normalized_shape) >= 1
            and int(m.normalized_shape[-1]) == int(in_hw[1])):
        return "statistics over the spatial axes"
    return ""


def _spatial_shape(node: fx.Node) -> Optional[Tuple[int, int, int]]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    shape = tuple(meta.shape)
    return tuple(int(s) for s in shape[1:]) if len(shape) == 4 else None


def _pads(node: fx.Node) -> Tuple[int, ...]:
    pads = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else ())
    return tuple(pads) if isinstance(pads, (tuple, list)) and all(isinstance(v, int) for v in pads) else ()


def _is_tensor_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and hasattr(node.meta.get("tensor_meta"), "shape")


_SHAPE_PRESERVING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity, nn.Dropout, nn.Dropout2d,
                     nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                     nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)


class _ShapeRecorder(fx.Interpreter):
    """Runs a GraphModule and stores each node's output metadata in ``node.meta["tensor_meta"]``
    (as ``torch.fx.passes.shape_prop.ShapeProp`` does, without its traceback printing).
    ``shortcut``: modules that keep their input's shape pass it through (on meta tensors, where
    only shapes matter: batch norm's meta decomposition alone cost ~2 ms a layer)."""

    def __init__(self, gm: fx.GraphModule, shortcut: bool = False) -> None:
        super().__init__(gm)
        self.shortcut = shortcut

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if (self.shortcut and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
                and type(self.fetch_attr(target)) in _SHAPE_PRESERVING):
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.node import map_aggregate
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        found = []

        def extract(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                found.append(True)
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        return result


class RFGraph:
    """A traced model with the receptive field of every tensor node."""

    def __init__(self, model: nn.Module, input_size: Tuple[int, int, int]) -> None:
        tracer = _Tracer()
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot analyse"
            raise ErfLabError(
                f"cannot trace {type(model).__name__} with torch.fx for the theoretical receptive field "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        self.gm = fx.GraphModule(model, graph)
        self.module_outputs = tracer.module_outputs
        self.module_calls = tracer.module_calls
        self.input_size = tuple(int(v) for v in input_size)
        declared = getattr(model, "input_shape", None)  # a torch.export program's; its batch may be static
        self.batch = declared[0] if isinstance(declared, tuple) and declared and isinstance(declared[0], int) else 1
        self._propagate_shapes()
        self.rf: Dict[fx.Node, LayerRF] = {}
        self._propagate_rf()

    def _propagate_shapes(self) -> None:
        """Records ``tensor_meta`` (shapes) on every node: on the meta device (parameters swapped
        for meta tensors: no compute, a few ms), else with fake activations, else with a real pass."""
        param = next((p for p in self.gm.parameters() if p.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        try:
            from torch.nn.utils.stateless import _reparametrize_module

            state = {k: v.to("meta") for k, v in itertools.chain(self.gm.named_parameters(), self.gm.named_buffers())}
            with _reparametrize_module(self.gm, state), torch.no_grad():
                x = torch.empty(self.batch, *self.input_size, dtype=dtype, device="meta")
                _ShapeRecorder(self.gm, shortcut=True).run(x)
            return
        except Exception:  # noqa: BLE001 - an op without a meta kernel, or a non-parameter tensor attribute
            pass
        example = torch.zeros(self.batch, *self.input_size, dtype=dtype, device=device)
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            # Fake activations against the real (un-copied) parameters.
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                _ShapeRecorder(self.gm).run(mode.from_tensor(example))
            return
        except Exception:  # noqa: BLE001 - fake tensors do not cover every op; use a real pass
            pass
        with torch.no_grad():
            was = self.gm.training
            self.gm.eval()
            try:
                _ShapeRecorder(self.gm).run(example)
            except Exception as exc:  # noqa: BLE001
                raise ErfLabError(
                    f"the model does not run on an input of size {list(self.input_size)}: {exc}".splitlines()[0]
                ) from exc
            finally:
                self.gm.train(was)

    def _propagate_rf(self) -> None:
        modules = dict(self.gm.named_modules())
        for node in self.gm.graph.nodes:
            shape = _spatial_shape(node)
            ins = [a for a in node.all_input_nodes if a in self.rf]
            if node.op == "placeholder":
                if not self.rf:
                    self.rf[node] = LayerRF(shape=shape)
                continue
            if node.op == "output" or not ins:
                if node.op != "output" and _is_tensor_node(node):
                    self.rf[node] = None  # constants: no field
                continue
            ins = [a for a in ins if self.rf[a] is not None]
            if not ins:
                self.rf[node] = None
                continue
            first = self.rf[ins[0]]
            in_hw = first.shape[1:] if first.spatial else None
            out_hw = shape[1:] if shape else None
            handled = False
            out = first
            if node.op == "call_module":
                out, handled = _module_rule(modules[node.target], first, in_hw, out_hw)
            elif node.op == "call_function" and node.target in _CONV_FUNCS:
                a = list(node.args) + [None] * 7
                kw = node.kwargs
                w = _spatial_shape(node.args[1])
                k = w[1:] if w else (1, 1)
                out = _window(first, k, kw.get("stride", a[3] or 1), kw.get("padding", a[4] or 0), kw.get("dilation", a[5] or 1))
                handled = True
            elif node.op == "call_function" and node.target in _POOL_FUNCS:
                a = list(node.args) + [None] * 5
                kw = node.kwargs
                k = kw.get("kernel_size", a[1])
                out = _window(first, k, kw.get("stride", a[2]) or k, kw.get("padding", a[3] or 0))
                handled = True
            elif node.op == "call_function" and node.target is F.pad and len(_pads(node)) == 4:
                out, handled = _pad(first, _pads(node)), True
            elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCS and out_hw is not None:
                out, handled = _adaptive(first, in_hw, out_hw), True
            elif node.op == "call_function" and _op_name(node.target):
                out, handled = _op_rule(node, self.rf, first, in_hw, out_hw)
                if not handled and len(ins) > 1:  # add, mul, cat, where...: a merge
                    out, handled = _union([self.rf[a] for a in ins]), True
            elif len(ins) > 1:
                out, handled = _union([self.rf[a] for a in ins]), True
            if not handled:
                # A single-input op: pointwise if it keeps the spatial grid, otherwise unknown.
                if shape is not None and first.spatial and shape[1:] == first.shape[1:]:
                    out = first
                elif node.op == "call_function" and node.target is operator.getitem:
                    out = first
                elif (_op_name(node.target) and first.spatial and not _is_tensor_node(node)
                      and _out_hw(node) == tuple(first.shape[1:])):
                    out = first  # an op with several outputs (native batch norm...) that keeps the grid
                elif shape is None and not _is_tensor_node(node):
                    self.rf[node] = None if node.op != "call_function" or node.target is not operator.getitem else first
                    continue
                elif first.global_ and not first.spatial:  # already global, no grid left to change
                    out = first
                else:
                    out = _as_global(first, f"{_target_name(node.target)} changes the spatial grid")
            if shape is not None:
                out = replace(out, shape=shape)
            elif _is_tensor_node(node):
                out = replace(out, shape=tuple(node.meta["tensor_meta"].shape[1:]))
                if not out.global_ and len(out.shape) != 3:
                    out = _as_global(out, "no spatial axes")
            self.rf[node] = out

    def of(self, layer: Optional[str] = None, index: Union[int, str, None] = None) -> LayerRF:
        """Field of ``layer``'s output (the model output when None), element ``index`` of a tuple/dict."""
        if layer in (None, ""):
            out = next(n for n in self.gm.graph.nodes if n.op == "output").args[0]
        else:
            if layer not in self.module_outputs:
                raise ErfLabError(f"no layer named {layer!r} in the traced graph")
            out = self.module_outputs[layer]
        if isinstance(out, (tuple, list, dict)):
            if index is None:
                index = 0 if not isinstance(out, dict) else next(iter(out))
            out = out[index]
        node = out.node if isinstance(out, fx.Proxy) else out
        rf = self.rf.get(node)
        if rf is None:
            raise ErfLabError(f"layer {layer!r} has no receptive field (its output is not computed from the image)")
        return rf


def trace_rf(model: nn.Module, input_size: Sequence[int]) -> RFGraph:
    """Traces ``model`` and returns the per-node receptive fields (``.of(layer)`` gives one layer's)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ErfLabError("a TorchScript model has no theoretical RF here (torch.fx cannot trace TorchScript): "
                          "use the eager checkpoint or a torch.export program (.pt2)")
    return RFGraph(model, tuple(input_size))


def _fmt(v: float) -> float:
    return float(v)


def theoretical_rf(model: nn.Module, input_size: Sequence[int]) -> "pandas.DataFrame":  # noqa: F821
    """Theoretical receptive field of every layer of ``model`` for one input size.

    Args:
        model: any traceable ``nn.Module`` (``torch.fx``; ``dk_ops`` modules are leaves).
        input_size: ``(C, H, W)`` or ``(H, W)`` (3 channels assumed).

    Returns:
        a DataFrame with one row per module (execution order) plus ``(output)``: ``layer``,
        ``type``, ``shape`` (C, H, W of the output), ``rf_y``/``rf_x`` (size in input pixels,
        ``inf`` when unbounded), ``stride_y``/``stride_x`` (effective stride), ``pad_y``/``pad_x``
        (effective padding: how far the field of unit 0 starts before pixel 0),
        ``center0_y``/``center0_x`` (input-pixel centre of unit 0), ``global``, ``aligned``
        and ``notes``.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, stride=2))
        >>> theoretical_rf(net, (3, 32, 32)).loc[:, ["layer", "rf_y", "stride_y"]].values.tolist()
        [['0', 3.0, 1.0], ['1', 5.0, 2.0], ['(output)', 5.0, 2.0]]
    """
    import pandas as pd

    input_size = tuple(int(v) for v in input_size)
    if len(input_size) == 2:
        input_size = (3,) + input_size
    g = trace_rf(model, input_size)
    modules = dict(model.named_modules())
    rows = []
    order = {n: i for i, n in enumerate(g.gm.graph.nodes)}
    names = sorted(g.module_outputs, key=lambda n: _order(order, g.module_outputs[n]))
    for name in names + ["(output)"]:
        try:
            rf = g.of(None if name == "(output)" else name)
        except ErfLabError:
            continue
        kind = "" if name == "(output)" else _type_name(modules[name])
        rows.append(
            {
                "layer": name,
                "type": kind,
                "shape": tuple(rf.shape) if rf.shape is not None else None,
                "rf_y": _fmt(rf.y.size),
                "rf_x": _fmt(rf.x.size),
                "stride_y": _fmt(rf.y.jump),
                "stride_x": _fmt(rf.x.jump),
                "pad_y": _fmt((rf.y.size - 1) / 2 - rf.y.center0),
                "pad_x": _fmt((rf.x.size - 1) / 2 - rf.x.center0),
                "center0_y": _fmt(rf.y.center0),
                "center0_x": _fmt(rf.x.center0),
                "global": rf.global_,
                "aligned": rf.aligned,
                "notes": "; ".join(rf.notes),
            }
        )
    return pd.DataFrame(rows)


def _type_name(m: nn.Module) -> str:
    """The class name; for a ``torch.export.unflatten`` module the eager module's (``Conv2d``)."""
    unflattened = type(m).__module__ == "torch.export.unflatten" and callable(getattr(m, "type_name", None))
    eager = m.type_name() if unflattened else None
    return eager.rsplit(".", 1)[-1] if isinstance(eager, str) and eager else type(m).__name__


def _order(order: Dict[fx.Node, int], out: Any) -> int:
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    elif isinstance(out, dict):
        out = next(iter(out.values()), None)
    node = out.node if isinstance(out, fx.Proxy) else out
    return order.get(node, len(order))
