"""The operator choice shared by every zoo model: one factory for the depthwise layers."""
from typing import Optional

import torch.nn as nn

from .._utils import IntPair, pair
from ..modules import CondConv2d, DeformConv2d, DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d

OPS = ("conv", "dcn", "condconv", "dk_global", "dk", "dk_dcn")


def make_conv(
    op: str,
    in_channels: int,
    out_channels: int,
    kernel_size: IntPair = 3,
    stride: IntPair = 1,
    padding: Optional[IntPair] = None,
    dilation: IntPair = 1,
    groups: int = 1,
    bias: bool = False,
    scope_size: Optional[IntPair] = None,
    num_experts: int = 4,
    modulated: bool = False,
    offset_clip: Optional[str] = None,
) -> nn.Module:
    """A convolution layer of the chosen ``op``, with ``nn.Conv2d``'s arguments.

    ``padding`` defaults to "same" for odd kernels (``dilation * (k - 1) // 2``);
    ``scope_size`` defaults to ``kernel_size + 1`` for the DK variants (the
    paper's 3x3 kernel from a 4x4 scope); ``offset_clip="scope"`` keeps their
    kernel samples inside the scope (``dk_ops.modules``).
    """
    k = pair(kernel_size, "kernel_size")
    d = pair(dilation, "dilation")
    if padding is None:
        padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    if op == "conv":
        return nn.Conv2d(in_channels, out_channels, k, **common)
    if op == "dcn":
        return DeformConv2d(in_channels, out_channels, k, modulated=modulated, **common)
    if op == "condconv":
        return CondConv2d(in_channels, out_channels, k, num_experts=num_experts, **common)
    dk_classes = {"dk_global": GlobalDeformKernel2d, "dk": DeformKernel2d, "dk_dcn": DeformKernelConv2d}
    if op in dk_classes:
        return dk_classes[op](in_channels, out_channels, k, scope_size=scope_size, offset_clip=offset_clip, **common)
    raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")


def zero_offset_generators(model: nn.Module) -> None:
    """Re-zero offset generators and routing after a model-wide init loop touched them."""
    for m in model.modules():
        for name in ("kernel_offset_generator", "offset_generator", "routing"):
            gen = getattr(m, name, None)
            if gen is not None:
                nn.init.zeros_(gen.weight)
                nn.init.zeros_(gen.bias)
