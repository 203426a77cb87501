"""Which implementation of ``deform_kernel_conv2d`` runs where.

Three implementations:

* the pure-PyTorch reference path (:mod:`dk_ops.reference`, the numerical oracle, runs
  everywhere);
* the native kernels (``dk_ops/csrc``: C++ for CPU, CUDA C++ for GPUs), compiled on first use
  and registered as ``torch.ops.dk_ops.deform_kernel_conv2d``;
* the Triton kernels (:mod:`dk_ops.triton`), JIT-compiled by the triton that ships with every
  CUDA build of PyTorch on Linux (no toolkit, no compiler, no build step), registered as
  ``torch.ops.dk_ops_triton.deform_kernel_conv2d``.

``DK_OPS_BACKEND`` selects:

* unset / ``auto``: CPU tensors run native where it builds, else the reference path; CUDA
  tensors run Triton when triton imports and the kernels pass their first-use self-check on
  the device (:mod:`dk_ops.triton.selfcheck`), else the reference path. The CUDA C++ kernels are
  opt-in;
* ``reference``: the reference path everywhere;
* ``native``: the native kernels on CPU and CUDA tensors (a clear error when they cannot be built
  or do not cover the device);
* ``cuda``: the CUDA C++ kernels for CUDA tensors (an error when unavailable); CPU tensors as
  ``auto``;
* ``triton``: the Triton kernels for CUDA tensors, and for CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1``: the testing contract CI uses); an error where they cannot run or fail
  the self-check.

``DK_OPS_SELF_CHECK=0`` skips the self-check. Under ``torch.compile`` nothing is built: the native
op is used when it was loaded before tracing (a first eager call, or :func:`load_native`), else
the reference path is traced; the Triton op is traced whenever triton imports (its
implementation runs the self-check when it first executes).

:func:`dispatch` receives arguments already validated and normalised by
:func:`dk_ops.deform_kernel_conv2d`.
"""
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _native
from . import triton as _triton
from .reference import deform_kernel_conv2d_reference

__all__ = ["backend_info", "dispatch", "load_native", "load_triton", "selected_backend"]

_MODES = ("auto", "native", "reference", "triton", "cuda")


def _mode() -> str:
    mode = os.environ.get("DK_OPS_BACKEND", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"DK_OPS_BACKEND must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def load_native() -> bool:
    """Build (first time) or load the cached native kernels now; True when available."""
    return _native.load()


def load_triton() -> bool:
    """Import triton now (once); True when the Triton backend can run."""
    return _triton.load()


# What torch.compiler.assume_constant_result sets (without importing torch._dynamo, and with it
# triton, at `import dk_ops`): torch.compile calls load_triton eagerly while tracing and uses its
# result as a constant, so a first call inside a compiled region imports triton outside the graph.
load_triton._dynamo_marked_constant = True  # type: ignore[attr-defined]


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


def _native_or_reference(device: torch.device, forced: bool, mode: str) -> str:
    if torch.compiler.is_compiling():
        loaded = _native.is_loaded()  # never build while tracing
    else:
        loaded = _native.load()
    if loaded and _native_covers(device):
        return "native"
    if forced:
        if torch.compiler.is_compiling() and not _native.status()["attempted"]:
            raise RuntimeError(
                f"DK_OPS_BACKEND={mode}: the native kernels must be loaded before torch.compile traces the op; "
                "call dk_ops.backend.load_native() first"
            )
        raise RuntimeError(f"DK_OPS_BACKEND={mode} but native kernels are unavailable on {device}: "
                           f"{_unavailable_reason(device)}")
    return "reference"


def _triton_blocker(device: torch.device) -> Optional[str]:
    """None when the Triton kernels may run on ``device``, else why not (may run the self-check)."""
    if not load_triton():
        return f"triton is unavailable ({_triton.status()['error']})"
    if device.type == "cpu" and not _triton.interpreting():
        return "Triton has no CPU backend; TRITON_INTERPRET=1 runs its kernels on CPU tensors through the interpreter"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for device type {device.type!r}"
    if torch.compiler.is_compiling() or _triton.selfcheck.passed(device):
        return None
    r = _triton.selfcheck.result(device) or {}
    return f"the Triton kernels failed their self-check on {device}: {r.get('detail', '')}"


def selected_backend(device) -> str:
    """'native', 'triton' or 'reference': what a call on ``device`` runs now (may build the native
    kernels, import triton or run the Triton self-check)."""
    device = torch.device(device)
    mode = _mode()
    if mode == "reference":
        return "reference"
    if mode == "triton" or (mode == "auto" and device.type == "cuda"):
        why = _triton_blocker(device)
        if why is None:
            return "triton"
        if mode == "triton":
            raise RuntimeError(f"DK_OPS_BACKEND=triton but the Triton kernels cannot run on {device}: {why}")
        return "reference"
    if device.type == "cuda":  # native / cuda
        return _native_or_reference(device, forced=True, mode=mode)
    return _native_or_reference(device, forced=mode == "native", mode=mode)


def _triton_line(mode: str) -> str:
    if not _triton.load():
        return f"unavailable: {_triton.status()['error']}"
    parts = [f"triton {_triton.status()['version']} (ops torch.ops.dk_ops_triton.*)"]
    if _triton.interpreting():
        parts.append("TRITON_INTERPRET=1: kernels run through the interpreter (CPU tensors; testing mode)")
    if not _triton.selfcheck.enabled():
        parts.append("self-check off (DK_OPS_SELF_CHECK=0)")
    else:
        done = _triton.selfcheck.results()
        if done:
            parts.append("self-check: " + "; ".join(
                f"{dev} {'passed' if r['ok'] else 'FAILED (reference path used there): ' + r['detail']}"
                for dev, r in sorted(done.items())))
        else:
            parts.append("self-check on first use per CUDA device")
    return "; ".join(parts)


def _cuda_line(mode: str, st: dict) -> str:
    if mode in ("native", "cuda"):
        if st["loaded"] and st["cuda"]:
            return "native (CUDA C++ kernels; float16/bfloat16 accumulate in float32)"
        if st["loaded"]:
            return f"error (DK_OPS_BACKEND={mode}): no CUDA kernels in the native build: {st['cuda_reason']}"
        if st["attempted"]:
            return f"error (DK_OPS_BACKEND={mode}): native kernels unavailable"
        return "native CUDA C++ kernels once built (compiled on first use; needs nvcc matching this torch)"
    # auto / triton
    if torch.version.cuda is None:
        return "reference (pure PyTorch): this torch is built without CUDA"
    if not _triton.load():
        prefix = f"error (DK_OPS_BACKEND={mode})" if mode == "triton" else "reference (pure PyTorch)"
        return f"{prefix}: triton is unavailable ({_triton.status()['error']})"
    failed = sorted(d for d, r in _triton.selfcheck.results().items() if d.startswith("cuda") and not r["ok"])
    text = ("triton (JIT-compiled Triton kernels, no toolkit needed; float16/bfloat16 accumulate in float32; "
            "self-checked against the reference on first use per device)")
    if failed:
        text += f"; reference on {', '.join(failed)} (failed the self-check)"
    if not torch.cuda.is_available():
        text += "; no CUDA device here"
    return text


def backend_info() -> Dict[str, str]:
    """Report the implementation used on each device and why (native build status, triton, the
    Triton self-check results).

    Loads the native kernels when a cached build exists (cheap) and imports triton; does not compile.
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
        info["triton"] = "not used"
        return info
    if mode == "triton":
        if _triton.load() and _triton.interpreting():
            info["cpu"] = "triton (Triton's interpreter, TRITON_INTERPRET=1: the testing mode, slow)"
        else:
            info["cpu"] = ("error (DK_OPS_BACKEND=triton): CPU tensors need TRITON_INTERPRET=1 (Triton has no CPU "
                           "backend)")
    elif st["loaded"]:
        info["cpu"] = "native (C++ kernels, at::parallel_for; float16/bfloat16 computed in float32)"
    elif st["attempted"]:
        info["cpu"] = "reference (pure PyTorch): native kernels unavailable"
    else:
        info["cpu"] = "native once built (compiled on first use, then cached); reference until then"
    info["cuda"] = _cuda_line(mode, st)
    if st["loaded"]:
        native = f"loaded from {st['path']}"
        if st["cuda"]:
            native += "; with CUDA C++ kernels (used with DK_OPS_BACKEND=cuda or native)"
        else:
            native += f"; no CUDA C++ kernels: {st['cuda_reason']}"
    elif st["attempted"]:
        native = f"unavailable: {st['error']}"
    else:
        native = (f"not built yet: compiled on first use or by `python -m dk_ops._native` "
                  f"into {_native.build_dir()}")
    info["native"] = native
    info["triton"] = _triton_line(mode)
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
    """Run the selected implementation on validated arguments."""
    which = selected_backend(input.device)
    if which == "reference":
        return deform_kernel_conv2d_reference(
            input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation, groups
        )
    op = torch.ops.dk_ops.deform_kernel_conv2d if which == "native" else torch.ops.dk_ops_triton.deform_kernel_conv2d
    return op(
        input, weight, kernel_offset, offset, mask, bias,
        kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1], groups,
    )
