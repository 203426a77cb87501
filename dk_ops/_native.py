"""Building, loading and registering the native ``dk_ops`` kernels.

Nothing here runs at ``import dk_ops``: the extension is compiled on first use
(or on an explicit :func:`load`) with ``torch.utils.cpp_extension.load`` against
the torch that is running, so pip's build isolation can never pull a second
(CUDA) torch into the build. The build is cached in
``$DK_OPS_BUILD_DIR`` (default ``~/.cache/erf-lab/torch_extensions``) under a
name keyed by a hash of the sources, the torch version, the Python version and
the flags, so a new torch or an edited kernel gets a fresh build and CI compiles
once per cache.

Environment:

* ``DK_OPS_BUILD_DIR``: cache directory of the builds.
* ``DK_OPS_NO_CUDA=1``: build the CPU kernels only even where CUDA is usable.
* ``DK_OPS_VERBOSE_BUILD=1``: show the compiler's output.
* ``CXX``: the C++ compiler (as for any torch extension); ``MAX_JOBS`` its parallelism.

After loading, the fake (meta) kernels and the autograd formulas are registered
with ``torch.library.register_fake`` / ``register_autograd``; the backward
calls the registered ``dk_ops::_deform_kernel_conv2d_backward`` op.

Autocast policy: no autocast kernel is registered; :func:`dk_ops.deform_kernel_conv2d`
casts every argument to the autocast dtype (conv2d's rule) and calls the op with
autocast off. float16/bfloat16 are computed with float32 accumulation (CUDA) or
in float32 (CPU), so the op is safe in reduced precision.
"""
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

from ._utils import conv_out_size, memory_format_of

__all__ = ["load", "is_loaded", "has_cuda", "status", "cached_build_exists"]

_CSRC = Path(__file__).resolve().parent / "csrc"
_CPU_SOURCES = ["deform_kernel_conv2d.cpp", "cpu/deform_kernel_conv2d_kernel.cpp"]
_CUDA_SOURCES = ["cuda/deform_kernel_conv2d_kernel.cu"]
_HEADERS = ["deform_kernel_conv2d_impl.h", "cpu/depthwise_channels_last.h"]
# -fopenmp: ATen's at::parallel_for is header-inline and runs serially unless the
# extension itself is compiled with OpenMP; linking it resolves to the libgomp torch loaded.
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _isa_flags() -> List[str]:
    """AVX2 + FMA code where the running torch uses AVX2 or AVX-512 kernels (the build name
    includes these flags, so a machine without them builds its own baseline copy)."""
    if os.environ.get("DK_OPS_BASELINE_ISA", "") not in ("", "0"):
        return []
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch: stay with the baseline
        return []
    return ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []
_CUDA_FLAGS = ["-O3", "--extended-lambda", "--expt-relaxed-constexpr", "-lineinfo"]

_lock = threading.Lock()
_state = {
    "attempted": False,
    "loaded": False,
    "cuda": False,
    "path": None,
    "error": None,  # why native kernels are unavailable (None when loaded)
    "cuda_reason": None,  # why the CUDA kernels are not part of the build
}


def build_dir() -> Path:
    default = Path.home() / ".cache" / "erf-lab" / "torch_extensions"
    return Path(os.environ.get("DK_OPS_BUILD_DIR", str(default))).expanduser()


def _cuda_reason() -> Optional[str]:
    """None when the CUDA kernels can be built here, else why not."""
    if os.environ.get("DK_OPS_NO_CUDA", "") not in ("", "0"):
        return "disabled by DK_OPS_NO_CUDA"
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc (CUDA_HOME) not found"
    return None


def _arch_flags() -> List[str]:
    """Compile for the GPUs present (sm_90 on an H200) unless TORCH_CUDA_ARCH_LIST says otherwise."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or not torch.cuda.is_available():
        return []
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]


def _build_name(with_cuda: bool) -> str:
    h = hashlib.sha256()
    for rel in _CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if with_cuda else []):
        h.update(rel.encode())
        h.update((_CSRC / rel).read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(" ".join(_CFLAGS + _isa_flags() + _LDFLAGS + (_CUDA_FLAGS + _arch_flags() if with_cuda else [])).encode())
    return f"dk_ops_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:16]}"


def cached_build_exists(with_cuda: Optional[bool] = None) -> bool:
    if with_cuda is None:
        with_cuda = _cuda_reason() is None
    name = _build_name(with_cuda)
    return (build_dir() / name / f"{name}.so").exists()


def _summarise(exc: BaseException) -> str:
    """The informative lines of a build failure (compiler errors), not the whole log."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    picked = (errors or lines)[:6]
    return f"{type(exc).__name__}: " + " | ".join(picked)[:1200]


def _compile(with_cuda: bool) -> str:
    from torch.utils.cpp_extension import load as _load

    name = _build_name(with_cuda)
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(_CSRC / s) for s in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else [])]
    _load(
        name=name,
        sources=sources,
        extra_cflags=list(_CFLAGS) + _isa_flags(),
        extra_ldflags=list(_LDFLAGS),
        extra_cuda_cflags=list(_CUDA_FLAGS) + _arch_flags() if with_cuda else None,
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("DK_OPS_VERBOSE_BUILD", "") not in ("", "0"),
    )
    return str(directory / f"{name}.so")


def load() -> bool:
    """Build (or reuse the cached build of) the native kernels and register them.

    Returns True when loaded; otherwise :func:`status` says why. Never raises for a
    build failure: callers fall back to the reference path.
    """
    if _state["attempted"]:
        return _state["loaded"]
    with _lock:
        if _state["attempted"]:
            return _state["loaded"]
        try:
            compiler = os.environ.get("CXX", "c++")
            if shutil.which(compiler) is None:
                raise RuntimeError(f"no C++ compiler found (CXX={compiler!r} is not on PATH)")
            try:
                import ninja  # noqa: F401
            except ImportError:
                if shutil.which("ninja") is None:
                    raise RuntimeError("ninja is not installed (pip install ninja)") from None
            cuda_reason = _cuda_reason()
            path = None
            if cuda_reason is None:
                try:
                    path = _compile(with_cuda=True)
                    _state["cuda"] = True
                except Exception as exc:  # CUDA build failed: keep the CPU kernels at least
                    cuda_reason = "CUDA build failed: " + _summarise(exc)
            if path is None:
                path = _compile(with_cuda=False)
            _state["cuda_reason"] = cuda_reason
            _state["path"] = path
            _register()
            _state["loaded"] = True
        except Exception as exc:
            _state["error"] = _summarise(exc)
        finally:
            _state["attempted"] = True
    return _state["loaded"]


def is_loaded() -> bool:
    return _state["loaded"]


def has_cuda() -> bool:
    return _state["loaded"] and _state["cuda"]


def status() -> dict:
    return dict(_state)


# ----------------------------------------------------------------------------------------------
# torch.library registrations (Python side), done once after the library is loaded.

_SIZE_NAMES = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "groups")




def _register() -> None:
    lib = torch.ops.dk_ops

    @torch.library.register_fake("dk_ops::deform_kernel_conv2d")
    def _fake_forward(input, weight, kernel_offset, offset, mask, bias, kh, kw, sh, sw, ph, pw, dh, dw, groups):
        torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "dk_ops: input and weight must be 4-D")
        n, _, h, w = input.shape
        ho = conv_out_size(h, kh, sh, ph, dh)
        wo = conv_out_size(w, kw, sw, pw, dw)
        return input.new_empty((n, weight.shape[0], ho, wo)).contiguous(memory_format=memory_format_of(input))

    @torch.library.register_fake("dk_ops::_deform_kernel_conv2d_backward")
    def _fake_backward(grad, input, weight, kernel_offset, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, groups,
                       output_mask):
        def like(t, want):
            return t.new_empty(t.shape).contiguous(memory_format=memory_format_of(t)) if (want and t is not None) \
                else input.new_empty((0,))

        return (
            like(input, output_mask[0]),
            like(weight, output_mask[1]),
            like(kernel_offset, output_mask[2]),
            like(offset, output_mask[3]),
            like(mask, output_mask[4]),
            input.new_empty((weight.shape[0],)) if output_mask[5] else input.new_empty((0,)),
        )

    def _setup_context(ctx, inputs, output):
        input, weight, kernel_offset, offset, mask, bias = inputs[:6]
        ctx.sizes = inputs[6:]
        ctx.save_for_backward(input, weight, kernel_offset, offset, mask)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad):
        input, weight, kernel_offset, offset, mask = ctx.saved_tensors
        need = [bool(v) for v in ctx.needs_input_grad[:6]]
        need[5] = need[5] and ctx.has_bias
        grads = lib._deform_kernel_conv2d_backward(
            grad, input, weight, kernel_offset, offset, mask, *ctx.sizes, need
        )
        return tuple(g if want else None for g, want in zip(grads, need)) + (None,) * len(_SIZE_NAMES)

    torch.library.register_autograd("dk_ops::deform_kernel_conv2d", _backward, setup_context=_setup_context)


if __name__ == "__main__":  # python -m dk_ops._native : build now and report
    ok = load()
    print({k: v for k, v in status().items()})
    sys.exit(0 if ok else 1)
