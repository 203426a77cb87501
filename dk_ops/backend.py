"""Which implementation of ``deform_kernel_conv2d`` runs where.

Only the pure-PyTorch reference path exists so far; native kernels register here.
:func:`dispatch` receives arguments already validated and normalised by
:func:`dk_ops.deform_kernel_conv2d`.
"""
from typing import Dict, Optional, Tuple

from torch import Tensor

from .reference import deform_kernel_conv2d_reference


def backend_info() -> Dict[str, str]:
    """Report the implementation used on each device and why native kernels are unavailable."""
    return {
        "cpu": "reference (pure PyTorch)",
        "cuda": "reference (pure PyTorch)",
        "native": "unavailable: native kernels are not built yet",
    }


def dispatch(
    input: Tensor,
    weight: Tensor,
    kernel_offset: Optional[Tensor],
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    bias: Optional[Tensor],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
) -> Tensor:
    """Run the best available implementation on validated arguments."""
    return deform_kernel_conv2d_reference(
        input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation, groups
    )
