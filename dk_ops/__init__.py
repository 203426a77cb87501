"""dk_ops: Deformable Kernels (Gao et al., ICLR 2020), their baselines, and a model zoo.

Depends on torch only. ``import dk_ops`` never pulls matplotlib or the rest of erf-lab.
"""
from .backend import backend_info
from .functional import deform_kernel_conv2d

__all__ = ["deform_kernel_conv2d", "backend_info"]
__version__ = "0.1.0"
