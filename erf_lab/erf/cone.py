"""Cone pruning: compute each stage only over the cells that can reach the target unit.

A unit of layer T reads, from an earlier tensor v, only the cells within its relative field
``(r_T - r_v) / j_v + 1`` around its centre (the *cone*). When v *dominates* T in the traced
graph (every path from the image to T passes through v), cropping v's output to a window that
holds the cone, starting at a multiple of ``j_T / j_v`` cells so that later strided ops keep their
phase, changes nothing the unit sees: cells outside the window lose their neighbours, but they are
outside the cone. Dominators form a chain, so crops nest and one running offset suffices.
The engine verifies the result on the first image before using it.
"""
import math
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from ..rf import LayerRF

__all__ = ["plan_cone", "ConeCrop"]


def _target_node(graph: Any, layer: Optional[str], index: Any) -> Optional[fx.Node]:
    if layer in (None, ""):
        out = next(n for n in graph.gm.graph.nodes if n.op == "output").args[0]
    else:
        out = graph.module_outputs.get(layer)
    if isinstance(out, (tuple, list)):
        out = out[0 if index is None else index]
    elif isinstance(out, dict):
        out = out[next(iter(out)) if index is None else index]
    return out.node if isinstance(out, fx.Proxy) else out if isinstance(out, fx.Node) else None


def _reaches(start: fx.Node, goal: fx.Node, blocked: Optional[fx.Node]) -> bool:
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        if n is goal:
            return True
        if n is blocked or n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return False


def plan_cone(graph: Any, layer: Optional[str], index: Any, target: LayerRF) -> List[Tuple[str, LayerRF]]:
    """Modules whose output can be cropped to the target's cone: (name, field), in graph order."""
    t = _target_node(graph, layer, index)
    if t is None or not target.local():
        return []
    inputs = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return []
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    plan, used = [], set()
    for name, out in graph.module_outputs.items():
        node = out.node if isinstance(out, fx.Proxy) else None
        if graph.module_calls.get(name, 0) != 1:
            continue  # its hook would fire on every call, not only on this output
        if node is None or node is t or node in used or order[node] > order[t]:
            continue
        rf = graph.rf.get(node)
        if rf is None or not rf.local():
            continue
        my, mx = target.y.jump / rf.y.jump, target.x.jump / rf.x.jump
        if my != int(my) or mx != int(mx) or rf.y.jump != int(rf.y.jump) or rf.x.jump != int(rf.x.jump):
            continue
        if not _reaches(node, t, None) or _reaches(inputs[0], t, node):
            continue  # not an ancestor, or not a dominator
        used.add(node)
        plan.append((name, rf))
    plan.sort(key=lambda p: order[graph.module_outputs[p[0]].node])
    return plan


class _Crop(torch.autograd.Function):
    """``x[:, :, ys:ye, xs:xe]`` in x's memory format, whose backward pads the gradient with zeros in
    that format too (autograd's slice backward returns NCHW, which sends a channels-last model's
    backward through format conversions)."""

    @staticmethod
    def forward(ctx, x: Tensor, ys: int, ye: int, xs: int, xe: int) -> Tensor:  # noqa: D102
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
        ctx.box, ctx.shape, ctx.fmt = (ys, ye, xs, xe), x.shape, fmt
        return x[:, :, ys:ye, xs:xe].contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        ys, ye, xs, xe = ctx.box
        full = torch.empty(ctx.shape, dtype=g.dtype, device=g.device, memory_format=ctx.fmt)
        full[:, :, ys:ye, xs:xe] = g
        full[:, :, :ys].zero_()  # only the frame around the window needs zeros
        full[:, :, ye:].zero_()
        full[:, :, ys:ye, :xs].zero_()
        full[:, :, ys:ye, xe:].zero_()
        return full, None, None, None, None


class ConeCrop:
    """Forward hooks that crop each planned module's output to the target's cone."""

    def __init__(self, model: nn.Module, plan: Sequence[Tuple[str, LayerRF]], target: LayerRF,
                 centers: Sequence[Tuple[float, float]]) -> None:
        self.model = model
        self.items = list(plan)  # modules looked up when hooked: the run may swap some (erf_lab.erf.fold)
        self.target = target
        self.lo = (min(c[0] for c in centers), min(c[1] for c in centers))
        self.hi = (max(c[0] for c in centers), max(c[1] for c in centers))
        self.offset = [0, 0]  # pixels: where cell 0 of the current (cropped) grid sits in the full grid

    def _window(self, rf: LayerRF, shape: Tuple[int, int]) -> Optional[Tuple[int, int, int, int]]:
        box = []
        for a, (axis, t_axis) in enumerate(((rf.y, self.target.y), (rf.x, self.target.x))):
            j = int(axis.jump)
            half = (t_axis.size - axis.size) / 2
            lo = math.ceil((self.lo[a] - half - axis.center0) / j - 1e-9)
            hi = math.floor((self.hi[a] + half - axis.center0) / j + 1e-9)
            if self.offset[a] % j:
                return None
            off = self.offset[a] // j
            m = int(t_axis.jump // j)
            s = max(0, (lo - off) // m * m)
            e = min(shape[a], hi - off + 1)
            if e <= s:
                return None
            box.append((s, e))
        return box[0][0], box[1][0], box[0][1], box[1][1]

    @contextmanager
    def active(self, origin: Tuple[int, int]) -> Iterator["ConeCrop"]:
        self.offset = [int(origin[0]), int(origin[1])]
        handles = []

        for name, rf in self.items:
            module = self.model.get_submodule(name)

            def hook(mod, inp, out, rf=rf):
                if not isinstance(out, Tensor) or out.dim() != 4:
                    return None
                w = self._window(rf, (out.shape[2], out.shape[3]))
                if w is None:
                    return None
                ys, xs, ye, xe = w
                if (ys, xs, ye, xe) == (0, 0, out.shape[2], out.shape[3]):
                    return None
                self.offset[0] += ys * int(rf.y.jump)
                self.offset[1] += xs * int(rf.x.jump)
                return _Crop.apply(out, ys, ye, xs, xe)

            handles.append(module.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def shift(self) -> Tuple[int, int]:
        """Target cells between the full grid's cell 0 and the cropped grid's cell 0."""
        return int(self.offset[0] // self.target.y.jump), int(self.offset[1] // self.target.x.jump)
