"""Swap ``nn.Conv2d`` layers of an existing model for deformable variants, keeping its function."""
import copy
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ._utils import IntPair, pair
from .models._layers import OPS, make_conv
from .modules import CondConv2d, DeformConv2d, _ConvLike, DeformKernelBase
from .reference import sample_kernel

__all__ = ["convert_model", "scope_from_kernel"]

Selector = Union[str, Callable[[str, nn.Conv2d], bool]]


def _resample_matrix(k: int, s: int, dtype=torch.float64) -> Tensor:
    """(k, s) matrix of the zero-offset bilinear resampling of one scope axis."""
    pos = (s - k) / 2 + torch.arange(k, dtype=dtype)
    cells = torch.arange(s, dtype=dtype)
    return (1 - (pos[:, None] - cells[None, :]).abs()).clamp(min=0)


def scope_from_kernel(kernel: Tensor, scope_size: IntPair, atol: float = 1e-5) -> Tensor:
    """The minimum-norm scope weight whose zero-offset resampling equals ``kernel``.

    ``kernel`` is ``(..., k_h, k_w)``; the result is ``(..., S_h, S_w)``. The
    resampling is separable, ``K = R_h W R_w^T`` with full-row-rank ``R``, so
    ``W = pinv(R_h) K pinv(R_w)^T`` reproduces ``K`` exactly (verified to ``atol``).
    """
    kh, kw = kernel.shape[-2:]
    sh, sw = pair(scope_size, "scope_size")
    if sh < kh or sw < kw:
        raise ValueError(f"scope_size {(sh, sw)} must be at least the kernel size {(kh, kw)}")
    rh, rw = _resample_matrix(kh, sh), _resample_matrix(kw, sw)
    k64 = kernel.detach().to(torch.float64)
    scope = torch.linalg.pinv(rh) @ k64 @ torch.linalg.pinv(rw).T
    back = rh @ scope @ rw.T
    err = (back - k64).abs().max().item() if back.numel() else 0.0
    if err > atol:
        raise RuntimeError(f"scope fit failed: max error {err:.3g} > {atol}")
    return scope.to(kernel.dtype)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def convert_model(
    model: nn.Module,
    op: str = "dk",
    scope_size: Optional[IntPair] = None,
    which: Selector = "depthwise",
    inplace: bool = False,
    **op_kwargs,
) -> nn.Module:
    """Replace ``nn.Conv2d`` layers by the chosen operator, computing the same function.

    Args:
        model: the model to convert (copied unless ``inplace``).
        op: one of ``conv`` (no change), ``dcn``, ``condconv``, ``dk_global``, ``dk``, ``dk_dcn``.
        scope_size: scope of the DK variants (default ``kernel_size + 1``). The scope
            weight is fitted so that its zero-offset resampling is the original kernel.
        which: ``"depthwise"`` (groups == in_channels > 1), ``"all"``, or a callable
            ``(qualified_name, conv) -> bool``.
        **op_kwargs: passed to :func:`dk_ops.models.make_conv` (``num_experts``, ``modulated``).

    Offset generators start at zero (and the DCNv2 mask at 1; CondConv experts are
    set to ``2 W / E`` so that the initial routing 0.5 mixes back to ``W``), so the
    converted model's outputs equal the original's at conversion time.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    if isinstance(which, str):
        if which not in ("depthwise", "all"):
            raise ValueError(f"which must be 'depthwise', 'all' or a callable, got {which!r}")
        select = (lambda name, m: _is_depthwise(m)) if which == "depthwise" else (lambda name, m: True)
    elif callable(which):
        select = which
    else:
        raise ValueError(f"which must be 'depthwise', 'all' or a callable, got {which!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if op == "conv":
        return model

    targets = []
    for name, module in model.named_modules():
        if isinstance(module, (_ConvLike,)):
            continue
        for child_name, child in module.named_children():
            if type(child) is not nn.Conv2d:
                continue
            qual = f"{name}.{child_name}" if name else child_name
            if _inside_ours(model, qual) or not select(qual, child):
                continue
            targets.append((module, child_name, child))
    for parent, child_name, conv in targets:
        setattr(parent, child_name, _convert_conv(conv, op, scope_size, **op_kwargs))
    return model


def _inside_ours(model: nn.Module, qual: str) -> bool:
    """Whether a qualified name lies inside one of our modules (their generators are not converted)."""
    parts = qual.split(".")
    m = model
    for p in parts[:-1]:
        m = getattr(m, p)
        if isinstance(m, _ConvLike):
            return True
    return False


@torch.no_grad()
def _convert_conv(conv: nn.Conv2d, op: str, scope_size: Optional[IntPair], **op_kwargs) -> nn.Module:
    if conv.padding_mode != "zeros":
        raise ValueError(f"cannot convert a Conv2d with padding_mode={conv.padding_mode!r}; only 'zeros' is supported")
    if isinstance(conv.padding, str):
        raise ValueError(f"cannot convert a Conv2d with padding={conv.padding!r}; give explicit padding")
    new = make_conv(
        op,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        scope_size=scope_size,
        **op_kwargs,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    if isinstance(new, DeformKernelBase):
        new.weight.copy_(scope_from_kernel(conv.weight, new.scope_size))
        check = sample_kernel(new.weight.double(), None, new.kernel_size)[0, ..., 0]
        err = (check.reshape(conv.weight.shape) - conv.weight.double()).abs().max().item()
        if err > 1e-5:
            raise RuntimeError(f"scope fit failed: max error {err:.3g} > 1e-5")
    elif isinstance(new, DeformConv2d):
        new.weight.copy_(conv.weight)
    elif isinstance(new, CondConv2d):
        new.weight.copy_(conv.weight.unsqueeze(0).expand_as(new.weight) * (2.0 / new.num_experts))
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new.train(conv.training)
