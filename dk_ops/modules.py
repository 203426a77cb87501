"""Deformable-kernel modules and their baselines, drop-in for ``nn.Conv2d``.

Every module takes ``nn.Conv2d``'s leading arguments (in_channels, out_channels,
kernel_size, stride, padding, dilation, groups, bias). They differ only in how
they produce offsets; all call :func:`dk_ops.deform_kernel_conv2d` (CondConv,
which has no offsets, mixes expert kernels and calls a grouped convolution).

Offset generators are zero-initialised, so a fresh module computes the rigid
kernel: a plain convolution with the zero-offset resampling of its scope.
``forward(x, return_offsets=True)`` also returns the offsets it used.
"""
import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import IntPair, pair
from .functional import deform_kernel_conv2d

__all__ = [
    "DeformKernelBase",
    "GlobalDeformKernel2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
    "DeformConv2d",
    "CondConv2d",
]

_Output = Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]


def _conv_like_init(weight: Tensor, bias: Optional[Tensor], fan_in: int) -> None:
    """``nn.Conv2d.reset_parameters`` with an explicit fan-in (that of the sampled kernel)."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        b = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -b, b)


class _ConvLike(nn.Module):
    """Shared ``nn.Conv2d``-style arguments, bias, checks and ``extra_repr``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels={out_channels} must be divisible by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    @property
    def num_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def _offset_conv(self, out_channels: int) -> nn.Conv2d:
        """A zero-initialised generator conv with this layer's geometry (so it sees the same window)."""
        conv = nn.Conv2d(
            self.in_channels, out_channels, self.kernel_size, self.stride, self.padding, self.dilation, bias=True
        )
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class DeformKernelBase(_ConvLike):
    """A scope weight resampled by kernel offsets; subclasses define the offset generator."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        scope_size: Optional[IntPair] = None,
        kernel_offset_groups: int = 1,
        offset_clip: Optional[str] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        kh, kw = self.kernel_size
        self.scope_size = (kh + 1, kw + 1) if scope_size is None else pair(scope_size, "scope_size")
        if self.scope_size[0] < kh or self.scope_size[1] < kw:
            raise ValueError(f"scope_size {self.scope_size} must be at least kernel_size {self.kernel_size}")
        if out_channels % kernel_offset_groups != 0:
            raise ValueError(
                f"kernel_offset_groups={kernel_offset_groups} must divide out_channels={out_channels}"
            )
        if offset_clip not in (None, "scope"):
            raise ValueError(f"offset_clip must be None or 'scope', got {offset_clip!r}")
        self.kernel_offset_groups = kernel_offset_groups
        self.offset_clip = offset_clip
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.scope_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = (self.in_channels // self.groups) * self.num_taps
        _conv_like_init(self.weight, self.bias, fan_in)

    def clip_kernel_offset(self, kernel_offset: Tensor) -> Tensor:
        """Clamp offsets so every sampled coordinate stays in ``[0, S - 1]`` on its own axis."""
        if self.offset_clip is None:
            return kernel_offset
        (kh, kw), (sh, sw) = self.kernel_size, self.scope_size
        dev, dt = kernel_offset.device, kernel_offset.dtype
        u0 = (sh - kh) / 2 + torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw)
        v0 = (sw - kw) / 2 + torch.arange(kw, device=dev, dtype=dt).repeat(kh)
        lo = torch.stack([-u0, -v0], dim=-1)  # (K, 2)
        hi = torch.stack([sh - 1 - u0, sw - 1 - v0], dim=-1)
        n = kernel_offset.shape[0]
        shape = (n, self.kernel_offset_groups, self.num_taps, 2) + tuple(kernel_offset.shape[2:])
        extra = (1,) * (kernel_offset.dim() - 2)
        dk = kernel_offset.reshape(shape)
        dk = torch.maximum(torch.minimum(dk, hi.view(1, 1, -1, 2, *extra)), lo.view(1, 1, -1, 2, *extra))
        return dk.reshape(kernel_offset.shape)

    def _conv(self, x: Tensor, kernel_offset: Optional[Tensor], offset=None, mask=None) -> Tensor:
        return deform_kernel_conv2d(
            x,
            self.weight,
            kernel_offset,
            offset,
            mask,
            self.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", scope_size={self.scope_size}"
        if self.kernel_offset_groups != 1:
            s += f", kernel_offset_groups={self.kernel_offset_groups}"
        if self.offset_clip is not None:
            s += f", offset_clip={self.offset_clip!r}"
        return s


class GlobalDeformKernel2d(DeformKernelBase):
    """Deformable kernel with one set of kernel offsets per sample (DK global).

    Offsets: global average pool -> Linear -> ``2 * kernel_offset_groups * k_h * k_w``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_offset_generator = nn.Linear(self.in_channels, 2 * self.kernel_offset_groups * self.num_taps)
        nn.init.zeros_(self.kernel_offset_generator.weight)
        nn.init.zeros_(self.kernel_offset_generator.bias)

    def forward(self, x: Tensor, return_offsets: bool = False) -> _Output:
        dk = self.clip_kernel_offset(self.kernel_offset_generator(x.mean(dim=(2, 3))))
        y = self._conv(x, dk)
        return (y, {"kernel_offset": dk}) if return_offsets else y


class DeformKernel2d(DeformKernelBase):
    """Deformable kernel with kernel offsets per output position (DK local, the paper's default).

    Offsets: a conv with the layer's own kernel size, stride, padding and dilation.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_offset_generator = self._offset_conv(2 * self.kernel_offset_groups * self.num_taps)

    def forward(self, x: Tensor, return_offsets: bool = False) -> _Output:
        dk = self.clip_kernel_offset(self.kernel_offset_generator(x))
        y = self._conv(x, dk)
        return (y, {"kernel_offset": dk}) if return_offsets else y


class DeformKernelConv2d(DeformKernelBase):
    """Deformable kernel and deformable convolution together (DK+DCN).

    Kernel offsets and image offsets are each learnt by their own zero-initialised
    conv generator (the 2020 code never learnt the kernel offsets of this variant).
    """

    def __init__(self, *args, offset_groups: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.in_channels % offset_groups != 0:
            raise ValueError(f"offset_groups={offset_groups} must divide in_channels={self.in_channels}")
        self.offset_groups = offset_groups
        self.kernel_offset_generator = self._offset_conv(2 * self.kernel_offset_groups * self.num_taps)
        self.offset_generator = self._offset_conv(2 * offset_groups * self.num_taps)

    def forward(self, x: Tensor, return_offsets: bool = False) -> _Output:
        dk = self.clip_kernel_offset(self.kernel_offset_generator(x))
        off = self.offset_generator(x)
        y = self._conv(x, dk, off)
        return (y, {"kernel_offset": dk, "offset": off}) if return_offsets else y

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", offset_groups={self.offset_groups}" if self.offset_groups != 1 else "")


class DeformConv2d(_ConvLike):
    """Deformable convolution (DCN v1; DCN v2 with ``modulated=True``).

    Image offsets (and the mask) come from a zero-initialised conv. The mask is
    ``2 * sigmoid(logits)``, so it lies in (0, 2) and starts at exactly 1: a fresh
    module equals the rigid convolution (DCNv2's plain sigmoid would start at 0.5).
    ``offset_clip`` (a number of pixels or None) clamps the image offsets, which
    bounds the receptive field.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
        modulated: bool = False,
        offset_clip: Optional[float] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if in_channels % offset_groups != 0:
            raise ValueError(f"offset_groups={offset_groups} must divide in_channels={in_channels}")
        if offset_clip is not None and not (isinstance(offset_clip, (int, float)) and offset_clip >= 0):
            raise ValueError(f"offset_clip must be None or a non-negative number of pixels, got {offset_clip!r}")
        self.offset_groups = offset_groups
        self.modulated = modulated
        self.offset_clip = offset_clip
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        n_off = offset_groups * self.num_taps
        self.offset_generator = self._offset_conv(3 * n_off if modulated else 2 * n_off)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _conv_like_init(self.weight, self.bias, (self.in_channels // self.groups) * self.num_taps)

    def forward(self, x: Tensor, return_offsets: bool = False) -> _Output:
        raw = self.offset_generator(x)
        n_off = 2 * self.offset_groups * self.num_taps
        off, mask = raw[:, :n_off], None
        if self.offset_clip is not None:
            off = off.clamp(-self.offset_clip, self.offset_clip)
        if self.modulated:
            mask = 2 * torch.sigmoid(raw[:, n_off:])
        y = deform_kernel_conv2d(
            x,
            self.weight,
            None,
            off,
            mask,
            self.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        if not return_offsets:
            return y
        used = {"offset": off}
        if mask is not None:
            used["mask"] = mask
        return y, used

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.modulated:
            s += ", modulated=True"
        if self.offset_clip is not None:
            s += f", offset_clip={self.offset_clip}"
        return s


class CondConv2d(_ConvLike):
    """Conditionally parameterised convolution (Yang et al., NeurIPS 2019).

    The kernel of each sample is ``sum_e r_e W_e`` with routing weights
    ``r = sigmoid(Linear(GAP(x)))``. The routing layer is zero-initialised
    (``r_e = 0.5``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.routing = nn.Linear(in_channels, num_experts)
        nn.init.zeros_(self.routing.weight)
        nn.init.zeros_(self.routing.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = (self.in_channels // self.groups) * self.num_taps
        for e in range(self.num_experts):
            _conv_like_init(self.weight[e], None, fan_in)
        if self.bias is not None:
            _conv_like_init(torch.empty(1, fan_in), self.bias, fan_in)

    def forward(self, x: Tensor, return_offsets: bool = False) -> _Output:
        n, c, h, w = x.shape
        r = torch.sigmoid(self.routing(x.mean(dim=(2, 3))))  # (N, E)
        if n == 0:  # a grouped conv with zero groups is not defined; the shape is that of one expert
            y = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            kernels = torch.einsum("ne,eocij->nocij", r, self.weight)
            # One grouped convolution over the whole batch: sample n is group block n.
            y = F.conv2d(
                x.reshape(1, n * c, h, w),
                kernels.reshape(n * self.out_channels, *kernels.shape[2:]),
                None,
                self.stride,
                self.padding,
                self.dilation,
                groups=n * self.groups,
            )
            y = y.reshape(n, self.out_channels, y.shape[-2], y.shape[-1])
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return (y, {"routing": r}) if return_offsets else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_experts={self.num_experts}"
