"""dk_ops: Deformable Kernels (Gao et al., ICLR 2020), their baselines, and a model zoo.

Depends on torch only: ``import dk_ops`` never pulls matplotlib or the rest of erf-lab.

* :func:`deform_kernel_conv2d`: the one functional operator (DK, DCN, DK+DCN, conv).
* Modules, drop-in for ``nn.Conv2d``: :class:`GlobalDeformKernel2d`,
  :class:`DeformKernel2d`, :class:`DeformKernelConv2d`, :class:`DeformConv2d`,
  :class:`CondConv2d`.
* :func:`convert_model`: swap a model's convolutions for these, keeping its function.
* :mod:`dk_ops.models`: the zoo (``create``, ``names``, ``complexity``).
"""
from . import models
from .backend import backend_info
from .convert import convert_model, scope_from_kernel
from .functional import deform_kernel_conv2d
from .modules import CondConv2d, DeformConv2d, DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d

__all__ = [
    "deform_kernel_conv2d",
    "backend_info",
    "GlobalDeformKernel2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
    "DeformConv2d",
    "CondConv2d",
    "convert_model",
    "scope_from_kernel",
    "models",
]
__version__ = "0.1.0"
