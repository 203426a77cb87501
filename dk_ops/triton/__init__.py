"""The Triton backend of ``deform_kernel_conv2d``: the GPU path of stock CUDA PyTorch.

Every CUDA build of PyTorch on Linux ships Triton, so this backend needs no CUDA toolkit,
compiler or build step: the kernels are JIT-compiled by triton on first use (and cached by
it). The same kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how CI verifies them against the reference path without a GPU.

* :mod:`dk_ops.triton.kernels`: the ``@triton.jit`` kernels (imported on first use);
* :mod:`dk_ops.triton._impl`: host code (buffers, grids, GEMMs), ``forward`` / ``backward``
  with the native ops' semantics;
* :mod:`dk_ops.triton.ops`: ``torch.ops.dk_ops_triton.deform_kernel_conv2d`` and its backward,
  registered with torch.library (fake kernels, autograd) when this package is imported;
* :mod:`dk_ops.triton.selfcheck`: the first-use check on each CUDA device.

Importing this package imports torch only; :func:`load` imports triton.
"""
import threading
from typing import Optional

from . import ops, selfcheck
from ._impl import interpreting

__all__ = ["available", "load", "status", "interpreting", "ops", "selfcheck", "MIN_TRITON"]

MIN_TRITON = (3, 0)  # APIs used: tl.dot(input_precision=, out_dtype=), tl.static_range, tl.atomic_add

_lock = threading.Lock()
_state = {"attempted": False, "ok": False, "version": None, "error": None}


def _parse(version: str):
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def load() -> bool:
    """Import triton (once); True when the Triton backend can run here."""
    if _state["attempted"]:
        return _state["ok"]
    with _lock:
        if _state["attempted"]:
            return _state["ok"]
        try:
            import triton
            import triton.language  # noqa: F401

            _state["version"] = getattr(triton, "__version__", "unknown")
            if _parse(_state["version"]) < MIN_TRITON:
                raise ImportError(f"triton {_state['version']} is older than "
                                  f"{'.'.join(map(str, MIN_TRITON))}")
            _state["ok"] = True
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            _state["attempted"] = True
    return _state["ok"]


def available() -> bool:
    return load()


def status() -> dict:
    return dict(_state)


def version() -> Optional[str]:
    return _state["version"] if load() else None
