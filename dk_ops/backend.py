"""Which implementation of ``deform_kernel_conv2d`` runs where.

Two implementations: the pure-PyTorch reference path (:mod:`dk_ops.reference`,
the numerical oracle, runs everywhere) and the native kernels
(``dk_ops/csrc``: C++ for CPU, CUDA for GPUs), registered as
``torch.ops.dk_ops.deform_kernel_conv2d`` with fake kernels and autograd.

The native kernels are compiled on first use and cached (see
:mod:`dk_ops._native`); ``import dk_ops`` never compiles anything. Selection:

* ``DK_OPS_BACKEND=reference`` always runs the reference path;
* ``DK_OPS_BACKEND=native`` requires the native kernels (a clear error when they
  cannot be built or do not cover the input's device);
* unset (``auto``): native where built for the device, reference otherwise (a
  failed build falls back automatically; :func:`backend_info` says why).

Under ``torch.compile`` nothing is built: the native op is used when it was loaded
before tracing (a first eager call, or :func:`load_native`), else the reference
path is traced.

:func:`dispatch` receives arguments already validated and normalised by
:func:`dk_ops.deform_kernel_conv2d`.
"""
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _native
from .reference import deform_kernel_conv2d_reference

__all__ = ["backend_info", "dispatch", "load_native", "selected_backend"]

_MODES = ("auto", "native", "reference")


def _mode() -> str:
    mode = os.environ.get("DK_OPS_BACKEND", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"DK_OPS_BACKEND must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def load_native() -> bool:
    """Build (first time) or load the cached native kernels now; True when available."""
    return _native.load()


def _native_covers(device: torch.device) -> bool:
    if device.type == "cpu" or device.type == "meta":
        return True
    if device.type == "cuda":
        return _native.has_cuda()
    return False


def _unavailable_reason(device: torch.device) -> str:
    st = _native.status()
    if not st["loaded"]:
        return st["error"] or "native kernels not loaded"
    if device.type == "cuda":
        return f"the native build has no CUDA kernels: {st['cuda_reason']}"
    return f"no native kernels for device type {device.type!r}"


def selected_backend(device) -> str:
    """'native' or 'reference': what a call on ``device`` runs now (may build the kernels)."""
    device = torch.device(device)
    mode = _mode()
    if mode == "reference":
        return "reference"
    if torch.compiler.is_compiling():
        loaded = _native.is_loaded()  # never build while tracing
    else:
        loaded = _native.load()
    if loaded and _native_covers(device):
        return "native"
    if mode == "native":
        if torch.compiler.is_compiling() and not _native.status()["attempted"]:
            raise RuntimeError(
                "DK_OPS_BACKEND=native: the native kernels must be loaded before torch.compile traces the op; "
                "call dk_ops.backend.load_native() first"
            )
        raise RuntimeError(f"DK_OPS_BACKEND=native but native kernels are unavailable on {device}: "
                           f"{_unavailable_reason(device)}")
    return "reference"


def backend_info() -> Dict[str, str]:
    """Report the implementation used on each device and, if native kernels are unavailable, why.

    Loads the native kernels when a cached build exists (cheap); does not compile.
    """
    mode = _mode()
    st = _native.status()
    if not st["attempted"] and mode != "reference" and _native.cached_build_exists():
        _native.load()
        st = _native.status()
    info = {"mode": f"{mode} (DK_OPS_BACKEND)"}
    if mode == "reference":
        info["cpu"] = info["cuda"] = "reference (pure PyTorch; forced by DK_OPS_BACKEND=reference)"
        info["native"] = "not used"
        return info
    if st["loaded"]:
        info["cpu"] = "native (C++ kernels, at::parallel_for; float16/bfloat16 computed in float32)"
        if st["cuda"]:
            info["cuda"] = "native (CUDA kernels; float16/bfloat16 accumulate in float32)"
        else:
            info["cuda"] = f"reference (pure PyTorch): no CUDA kernels in the native build: {st['cuda_reason']}"
        info["native"] = f"loaded from {st['path']}"
    elif st["attempted"]:
        info["cpu"] = info["cuda"] = "reference (pure PyTorch): native kernels unavailable"
        info["native"] = f"unavailable: {st['error']}"
    else:
        info["cpu"] = "native once built (compiled on first use, then cached); reference until then"
        info["cuda"] = "native once built, if this torch has CUDA and nvcc is found; else reference"
        info["native"] = (f"not built yet: compiled on first use or by `python -m dk_ops._native` "
                          f"into {_native.build_dir()}")
    return info


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
    if selected_backend(input.device) == "native":
        return torch.ops.dk_ops.deform_kernel_conv2d(
            input, weight, kernel_offset, offset, mask, bias,
            kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1], groups,
        )
    return deform_kernel_conv2d_reference(
        input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation, groups
    )
