"""The engine's passes: the model prepared for them and restored afterwards (:func:`prepared`),
the batched backward of the units' targets (:class:`Engine`) and the loop that accumulates the
per-image maps over this process's images (:func:`accumulate`).

Speed: images are batched (eval mode keeps per-image gradients independent, so the gradient of
the batch sum is every image's own gradient), the forward stops at the layer, the parameters'
gradients are never built, accumulation stays on the device in float64, and non-finite
per-image maps are skipped and counted.
"""
import contextlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._layout import resolve_channels_last, to_channels_last
from ..layers import get_layer, run_to_layer, select_output, unit_activation
from .geometry import Geometry
from .locality import CheckFailed, CropPlan, CropRefused, agree
from .options import ERFOptions

__all__ = ["Engine", "prepared", "accumulate"]


class Engine:
    """The batched backward pass: the forward to the layer (cropped at ``origin``, through the
    cone when set), the target reduction of the units' channel vectors, and the per-image maps."""

    def __init__(self, model, layer, output_index, geo: Geometry, opts: ERFOptions, stop: bool) -> None:
        self.model, self.layer_name, self.output_index = model, layer, output_index
        self.layer = get_layer(model, layer)
        self.geo, self.opts, self.stop = geo, opts, stop
        self.origin: Tuple[int, int] = (0, 0)  # top-left pixel of the input crop
        self.cone = None  # a cone.ConeCrop when cone pruning is on

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
        must equal ``ref`` (a plain forward's, :func:`~erf_lab.erf.locality.reference`); raises :class:`CheckFailed`
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
                    raise CropRefused from exc
                raise
            v = self.unit_vectors(out, units)
            if check is not None and (check[1] is None or not agree(v.detach()[check[0] * n_u : (check[0] + 1) * n_u], check[1])):
                raise CheckFailed
            (g,) = torch.autograd.grad(self.reduce(v).sum(), xr)
        return g.view(b, n_u, *x.shape[1:])

    def captum_gradients(self, x: Tensor) -> Tensor:
        from captum.attr import NeuronGradient

        ng = NeuronGradient(self.model, self.layer)
        outs = []
        for u in self.geo.units:
            outs.append(ng.attribute(x.detach().clone().requires_grad_(True), neuron_selector=lambda o, u=u: self.target_vectors(o, [u])))
        return torch.stack(outs, 1)


@contextlib.contextmanager
def prepared(model: nn.Module, device: torch.device, channels_last: Union[bool, str]) -> Iterator[bool]:
    """The model ready for the passes: eval mode, no parameter gradients, on ``device``, in
    channels-last memory format when :func:`erf_lab._layout.resolve_channels_last` says so.
    Yields whether it runs channels-last; mode, gradient flags and format are restored on exit,
    also after an error."""
    was_training = model.training
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    converted = False
    try:
        model.eval().to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        channels_last = resolve_channels_last(channels_last, model, device)
        converted = bool(channels_last) and not any(
            p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
            for p in model.parameters())
        if converted:
            to_channels_last(model)
        yield bool(channels_last)
    finally:
        if converted:
            model.to(memory_format=torch.contiguous_format)
        for n, p in model.named_parameters():
            p.requires_grad_(grads_before.get(n, True))
        model.train(was_training)


def accumulate(engine: Engine, plan: CropPlan, load: Any, mine: Sequence[int], x_first: Tensor,
               first_is_mine: bool, batch_for: Any, bar: Any) -> Tuple[Tensor, Tensor, int]:
    """Sums the per-image maps of the images ``mine`` (loaded by ``load``; ``x_first`` is the first
    one, already loaded when ``first_is_mine``) into (U, H, W) float64 on the device. Returns that
    sum, (images used, images skipped as not finite), and the largest batch run."""
    device = x_first.device
    n_u, hw = len(engine.geo.units), tuple(x_first.shape[-2:])
    acc = torch.zeros(n_u, *hw, dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # used, skipped
    pos, batch_used = 0, 0
    while pos < len(mine):
        ids = mine[pos : pos + batch_for(plan.window)]
        if pos == 0 and not plan.pre_cropped and first_is_mine:  # the first image is loaded already
            x_full = x_first if len(ids) == 1 else torch.cat([x_first, load(ids[1:])])
        else:
            x_full = load(ids, plan.window if plan.pre_cropped else None)
        g, x_full = plan.gradients(x_full, batch_for)
        b = g.shape[0]
        maps = engine.per_image(g.flatten(0, 1)).view(b, n_u, *g.shape[-2:])
        ok = torch.isfinite(maps).flatten(2).all(2).all(1)  # (B,)
        maps = torch.where(ok.view(b, 1, 1, 1), maps, torch.zeros((), dtype=maps.dtype, device=device))
        w = plan.window
        if w is not None:
            acc[:, w[0] : w[2], w[1] : w[3]] += maps.sum(0)
        else:
            acc += maps.sum(0)
        counts[0] += ok.sum()
        counts[1] += (~ok).sum()
        pos += b
        batch_used = max(batch_used, b)
        bar.update(b)
    return acc, counts, batch_used
