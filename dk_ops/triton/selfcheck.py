"""First-use self-check of the Triton kernels on each device.

Kernels that have never run on a given GPU must not give its user silently wrong numbers: the
first time the Triton backend is used on a device, four tiny forward+backward cases (depthwise
with local kernel offsets, image offsets and mask; depthwise rigid; general groups with local
kernel offsets; general groups with global kernel offsets and image offsets; float32) are
compared with the reference path, computed in float64 on the CPU from the same inputs. The
compute takes milliseconds; the first call also JIT-compiles the kernels (cached by triton on
disk). On an exception or a mismatch one ``RuntimeWarning`` names the backend, the device and
the error, and the reference path is used on that device from then on (also inside compiled
graphs and exported programs: the ops check before launching).

``DK_OPS_SELF_CHECK=0`` turns the check off. Devices of the types in
:data:`CHECKED_DEVICE_TYPES` are checked (``cuda``); tests add ``cpu`` to run the check under
the interpreter.
"""
import os
import threading
import warnings
from typing import Dict, List, Optional

import torch

from .._utils import conv_out_size

__all__ = ["CHECKED_DEVICE_TYPES", "enabled", "passed", "result", "results", "run", "reset"]

CHECKED_DEVICE_TYPES = {"cuda"}
_results: Dict[str, dict] = {}
_lock = threading.RLock()

# (name, sizes, make-arguments spec); all float32, tiny.
_CASES = [
    ("depthwise, local kernel offsets, image offsets, mask",
     dict(n=2, c_in=4, c_out=4, hw=(6, 7), groups=4, gk=2, gi=2, mask=True, kernel="local", stride=(1, 1),
          padding=(1, 1), dilation=(1, 1))),
    ("depthwise, rigid sampling, local kernel offsets",
     dict(n=1, c_in=4, c_out=8, hw=(7, 6), groups=4, gk=1, gi=None, mask=False, kernel="local", stride=(2, 1),
          padding=(1, 2), dilation=(1, 2))),
    ("general groups, local kernel offsets",
     dict(n=2, c_in=4, c_out=6, hw=(6, 5), groups=2, gk=3, gi=None, mask=True, kernel="local", stride=(1, 2),
          padding=(1, 1), dilation=(2, 1))),
    ("general groups, global kernel offsets, image offsets",
     dict(n=2, c_in=4, c_out=4, hw=(5, 6), groups=1, gk=2, gi=1, mask=False, kernel="global", stride=(1, 1),
          padding=(1, 1), dilation=(1, 1))),
]


def enabled() -> bool:
    return os.environ.get("DK_OPS_SELF_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def _key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def result(device) -> Optional[dict]:
    """The stored result for ``device`` ({'ok', 'detail'}), or None when it has not been checked."""
    return _results.get(_key(device))


def results() -> Dict[str, dict]:
    return dict(_results)


def reset() -> None:
    with _lock:
        _results.clear()


def passed(device) -> bool:
    """Whether the Triton kernels may run on ``device`` (runs the check on first use)."""
    device = torch.device(device)
    if device.type not in CHECKED_DEVICE_TYPES or not enabled():
        return True
    r = _results.get(_key(device))
    if r is None:
        r = run(device)
    return r["ok"]


def _make(spec: dict, gen: torch.Generator) -> tuple:
    n, c_in, c_out, (h, w) = spec["n"], spec["c_in"], spec["c_out"], spec["hw"]
    k, scope = (3, 3), (4, 4)
    st, pd, dl = spec["stride"], spec["padding"], spec["dilation"]
    K = k[0] * k[1]
    ho = conv_out_size(h, k[0], st[0], pd[0], dl[0])
    wo = conv_out_size(w, k[1], st[1], pd[1], dl[1])

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    x = rnd(n, c_in, h, w)
    wt = rnd(c_out, c_in // spec["groups"], *scope)
    gk = spec["gk"]
    dk = rnd(n, 2 * gk * K, ho, wo, scale=1.3) if spec["kernel"] == "local" else rnd(n, 2 * gk * K, scale=1.3)
    off = None if spec["gi"] is None else rnd(n, 2 * spec["gi"] * K, ho, wo, scale=2.0)
    mask = torch.rand(n, (spec["gi"] or 1) * K, ho, wo, generator=gen) if spec["mask"] else None
    bias = rnd(c_out)
    sizes = (*k, *st, *pd, *dl, spec["groups"])
    return [x, wt, dk, off, mask, bias], sizes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_case(device: torch.device, spec: dict, seed: int, tol: float) -> List[str]:
    from . import _impl
    from .fallback import reference_backward, reference_forward

    gen = torch.Generator().manual_seed(seed)
    args, sizes = _make(spec, gen)
    p = _impl._P(args[0], args[1], args[2], args[3], args[4], *sizes)
    grad = torch.randn(p.N, p.Co, p.Ho, p.Wo, generator=gen)
    need = [True, True, args[2] is not None, args[3] is not None, args[4] is not None, True]
    dev_args = [None if a is None else a.to(device) for a in args]
    y = _impl.forward(*dev_args, *sizes)
    grads = _impl.backward(grad.to(device), *dev_args[:5], *sizes, need)
    ref_args = [None if a is None else a.double() for a in args]
    y_ref = reference_forward(*ref_args, sizes)
    g_ref = reference_backward(grad.double(), *ref_args[:5], sizes, need)
    bad = []
    names = ["output", "input grad", "weight grad", "kernel-offset grad", "offset grad", "mask grad", "bias grad"]
    for name, a, b, want in zip(names, (y,) + tuple(grads), (y_ref,) + tuple(g_ref), [True] + need):
        if not want:
            continue
        err = _rel(a, b)
        if not err <= tol:
            bad.append(f"{name} relative error {err:.2e} > {tol:.0e}")
    return bad


def run(device) -> dict:
    """Run the check on ``device`` now (once; later calls return the stored result)."""
    device = torch.device(device)
    key = _key(device)
    with _lock:
        if key in _results:
            return _results[key]
        allow_tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        tol = 2e-2 if allow_tf32 else 1e-4
        problems = []
        try:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
                for i, (name, spec) in enumerate(_CASES):
                    bad = _check_case(device, spec, 1234 + i, tol)
                    if bad:  # the first failing case is enough
                        problems.append(f"{name}: " + "; ".join(bad))
                        break
        except Exception as exc:  # noqa: BLE001 - a compile or launch failure is a failed check
            text = str(exc).strip()
            problems.append(f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": "))
        if problems:
            detail = " | ".join(problems)[:1000]
            r = {"ok": False, "detail": detail}
            warnings.warn(
                f"dk_ops: the Triton backend failed its self-check on {key} ({detail}); deform_kernel_conv2d "
                f"uses the reference path (pure PyTorch, slower) on this device. DK_OPS_SELF_CHECK=0 skips the "
                f"check.", RuntimeWarning, stacklevel=2)
        else:
            r = {"ok": True, "detail": f"{len(_CASES)} forward+backward cases match the reference"}
        _results[key] = r
        return r
