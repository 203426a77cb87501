"""Which implementation of ``deform_kernel_conv2d`` runs where.

Only the pure-PyTorch reference path exists so far; native kernels register here.
"""
from typing import Dict


def backend_info() -> Dict[str, str]:
    """Report the implementation used on each device and why native kernels are unavailable."""
    return {
        "cpu": "reference (pure PyTorch)",
        "cuda": "reference (pure PyTorch)",
        "native": "unavailable: native kernels are not built yet",
    }
