"""The one functional operator under every deformable-kernel module."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._utils import IntPair, conv_out_size, pair
from . import backend as _backend

__all__ = ["deform_kernel_conv2d"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``, or None when autocast is off there."""
    kind = device.type
    if kind not in ("cpu", "cuda"):
        return None
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 has no device-type argument
        return None
    return torch.get_autocast_dtype(kind) if enabled else None


def _shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t: Tensor, ref: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the input's dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the input's device {ref.device}, got {t.device}")


def _check_offset_like(
    name: str, t: Tensor, per_group: int, n: int, out_hw: Tuple[int, int], expected: str, allow_2d: bool = False
) -> int:
    """Validate an offset/mask tensor and return its group count."""
    dims = (2, 4) if allow_2d else (4,)
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {expected}, got {_shape(t)}")
    if t.shape[1] == 0 or t.shape[1] % per_group != 0:
        raise ValueError(
            f"{name} must have shape {expected}: its channel count must be a positive multiple of "
            f"{per_group}, got {_shape(t)}"
        )
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape {expected} with batch size {n}, got {_shape(t)}")
    if t.dim() == 4 and tuple(t.shape[2:]) != out_hw:
        raise ValueError(
            f"{name} must have shape {expected} with spatial size {out_hw} (the output size), got {_shape(t)}"
        )
    return t.shape[1] // per_group


def _check_input_and_weight(input: Tensor, weight: Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                            padding: Tuple[int, int], dilation: Tuple[int, int], groups: int) -> Tuple[int, int]:
    """Checks the input, the scope weight and the geometry; returns the output size (H_out, W_out)."""
    kh, kw = kernel_size
    if not isinstance(input, Tensor):
        raise ValueError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must have shape (batch_size, in_channels, height, width), got {_shape(input)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"input must be a floating-point tensor (float16/bfloat16/float32/float64), got {input.dtype}")
    _check_tensor("weight", weight, input)
    if weight.dim() != 4:
        raise ValueError(
            f"weight must have shape (out_channels, in_channels // groups, scope_height, scope_width), "
            f"got {_shape(weight)}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, padding={padding}, "
            f"dilation={dilation}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")

    n, c_in, h, w = input.shape
    c_out, cg, sh, sw = weight.shape
    if c_in % groups != 0:
        raise ValueError(f"groups={groups} must divide in_channels={c_in} (input shape {_shape(input)})")
    if c_out % groups != 0:
        raise ValueError(f"groups={groups} must divide out_channels={c_out} (weight shape {_shape(weight)})")
    if cg != c_in // groups:
        raise ValueError(
            f"weight must have shape ({c_out}, {c_in // groups}, scope_height, scope_width) for "
            f"in_channels={c_in} and groups={groups}, got {_shape(weight)}"
        )
    if kh > sh or kw > sw:
        raise ValueError(
            f"kernel_size {kernel_size} must not exceed the scope size (weight's last two dims), "
            f"got weight of shape {_shape(weight)}"
        )
    ho = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel_size={kernel_size}, stride={stride}, "
            f"padding={padding}, dilation={dilation}: the output would be {(ho, wo)}"
        )
    return ho, wo


def _check_offsets(input: Tensor, weight: Tensor, kernel_offset: Optional[Tensor], offset: Optional[Tensor],
                   mask: Optional[Tensor], bias: Optional[Tensor], kernel_size: Tuple[int, int],
                   out_hw: Tuple[int, int]) -> None:
    """Checks the kernel offsets, image offsets, mask and bias against the input, weight and output size."""
    n, c_in = input.shape[:2]
    c_out = weight.shape[0]
    K = kernel_size[0] * kernel_size[1]
    ho, wo = out_hw
    if kernel_offset is not None:
        _check_tensor("kernel_offset", kernel_offset, input)
        expected = (
            f"({n}, 2*kernel_offset_groups*{K}, {ho}, {wo}) or ({n}, 2*kernel_offset_groups*{K})"
        )
        gk = _check_offset_like("kernel_offset", kernel_offset, 2 * K, n, out_hw, expected, allow_2d=True)
        if c_out % gk != 0:
            raise ValueError(
                f"kernel_offset has {gk} groups ({kernel_offset.shape[1]} channels = 2*{gk}*{K}), "
                f"which must divide out_channels={c_out}; got shape {_shape(kernel_offset)}"
            )
    gi = None
    if offset is not None:
        _check_tensor("offset", offset, input)
        expected = f"({n}, 2*offset_groups*{K}, {ho}, {wo})"
        gi = _check_offset_like("offset", offset, 2 * K, n, out_hw, expected)
        if c_in % gi != 0:
            raise ValueError(
                f"offset has {gi} groups ({offset.shape[1]} channels = 2*{gi}*{K}), which must divide "
                f"in_channels={c_in}; got shape {_shape(offset)}"
            )
    if mask is not None:
        _check_tensor("mask", mask, input)
        if gi is not None:
            expected = f"({n}, {gi * K}, {ho}, {wo}) (offset_groups*{K}, matching offset)"
            gm = _check_offset_like("mask", mask, K, n, out_hw, expected)
            if gm != gi:
                raise ValueError(f"mask must have shape {expected}, got {_shape(mask)}")
        else:
            expected = f"({n}, offset_groups*{K}, {ho}, {wo})"
            gm = _check_offset_like("mask", mask, K, n, out_hw, expected)
            if c_in % gm != 0:
                raise ValueError(
                    f"mask has {gm} groups ({mask.shape[1]} channels = {gm}*{K}), which must divide "
                    f"in_channels={c_in}; got shape {_shape(mask)}"
                )
    if bias is not None:
        _check_tensor("bias", bias, input)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {_shape(bias)}")


def deform_kernel_conv2d(
    input: Tensor,
    weight: Tensor,
    kernel_offset: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    r"""Deformable-kernel convolution (Gao et al., "Deformable Kernels", ICLR 2020).

    A ``k_h x k_w`` kernel is bilinearly resampled from a larger ``S_h x S_w``
    *scope* weight at the regular kernel grid centred in the scope, moved by
    the *kernel offsets*; the input is read at the regular convolution grid,
    optionally moved by *image offsets* (deformable convolution, DCN) and
    modulated by a *mask* (DCNv2). Every deformable variant is a special case:
    DK (kernel offsets), DCN (``S = k``, image offsets), DK+DCN (both), plain
    convolution (``S = k``, no offsets). The exact semantics are in docs/design.md,
    section 2.

    Args:
        input (Tensor[batch_size, in_channels, in_height, in_width]): input.
        weight (Tensor[out_channels, in_channels // groups, scope_height, scope_width]):
            scope weight.
        kernel_offset (Tensor[batch_size, 2 * kernel_offset_groups * kernel_height * kernel_width,
            out_height, out_width] or Tensor[batch_size, 2 * kernel_offset_groups * kernel_height * kernel_width],
            optional): local (per position) or global (per sample) kernel offsets, in scope cells,
            laid out as ``(y, x)`` pairs per tap like torchvision's ``deform_conv2d``; output channel
            ``o`` uses kernel-offset group ``o // (out_channels // kernel_offset_groups)``. Default: zero.
        offset (Tensor[batch_size, 2 * offset_groups * kernel_height * kernel_width, out_height, out_width],
            optional): image offsets in input pixels; input channel ``c`` uses group
            ``c // (in_channels // offset_groups)``. Default: rigid sampling.
        mask (Tensor[batch_size, offset_groups * kernel_height * kernel_width, out_height, out_width],
            optional): modulation multiplying each sampled input value (not squashed by the op).
        bias (Tensor[out_channels], optional): added to the output.
        kernel_size (int or Tuple[int, int]): size of the sampled kernel, at most the scope size.
        stride, padding, dilation (int or Tuple[int, int]): as in ``torch.nn.functional.conv2d``.
        groups (int): blocked channel groups, as in ``torch.nn.functional.conv2d``.

    Under ``torch.autocast`` the op follows ``conv2d``: every tensor argument is cast
    to the autocast dtype (float16/bfloat16 are accumulated in float32).

    Returns:
        Tensor[batch_size, out_channels, out_height, out_width]

    Example::

        >>> x = torch.randn(2, 8, 16, 16)
        >>> scope = torch.randn(8, 1, 4, 4)          # depthwise, 4x4 scope
        >>> dk = torch.zeros(2, 2 * 3 * 3, 16, 16)   # one kernel-offset group, 3x3 kernel
        >>> y = deform_kernel_conv2d(x, scope, dk, kernel_size=3, padding=1, groups=8)
        >>> y.shape
        torch.Size([2, 8, 16, 16])
    """
    if isinstance(input, Tensor):
        autocast_dtype = _autocast_dtype(input.device)
        if autocast_dtype is not None:
            # Autocast policy: like conv2d, run in the autocast dtype (float32 accumulation inside).
            args = [None if t is None else t.to(autocast_dtype) for t in (input, weight, kernel_offset, offset, mask, bias)]
            with torch.autocast(input.device.type, enabled=False):
                return deform_kernel_conv2d(
                    *args, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups
                )
    kernel_size, stride, padding, dilation = (pair(v, name) for v, name in (
        (kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    out_hw = _check_input_and_weight(input, weight, kernel_size, stride, padding, dilation, groups)
    _check_offsets(input, weight, kernel_offset, offset, mask, bias, kernel_size, out_hw)
    return _backend.dispatch(
        input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation, groups
    )
