"""Compile every Triton kernel specialization the backend launches for real GPU targets, without a
GPU: ``python -m dk_ops.triton.aot_check [--targets 80,90] [--dtypes float32,...] [--quick]``.

The interpreter checks the kernels' numbers but not that the GPU compiler accepts them (dot
shapes, types, layouts); this check runs the host code of a grid of cases on CPU tensors with a
launcher that records each launch instead of running it, then hands every distinct
(kernel, argument types, constexprs) to ``triton.compile`` for ``GPUTarget("cuda", cc, 32)``
(down to a cubin with triton's bundled ptxas). Nothing is executed. Exit status 1 when a
compile fails. Must run without ``TRITON_INTERPRET`` (``@triton.jit`` would give interpreted
functions).
"""
import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

import torch

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64"}

# Cases covering every kernel and every constexpr branch (see tests/dk_ops/test_triton_interpreter.py).
CASES = [
    dict(groups=4, gk=2, gi=2, mask=True),                 # depthwise: local dk, offsets, mask
    dict(groups=4, kernel="global", bias=False),           # depthwise: global dk, rigid
    dict(groups=4, kernel=None, mask=True, gm=2),          # depthwise: no dk, mask only
    dict(groups=2, gk=2, gi=1, mask=True),                 # general: local dk, offsets, mask
    dict(groups=2, gk=2),                                  # general: local dk, rigid
    dict(groups=1, kernel="global", gi=1),                 # general: global dk, offsets
    dict(groups=1, kernel=None, mask=True),                # general: no dk, mask
]


def _case_args(cfg: dict, dtype: torch.dtype, k=(3, 3)):
    n, c_in, c_out, hw, scope = 2, 4, 4, (6, 7), (4, 4)
    groups, gk, gi, gm = cfg.get("groups", 1), cfg.get("gk", 1), cfg.get("gi"), cfg.get("gm")
    K = k[0] * k[1]
    ho, wo = hw[0] + 2 - k[0] + 1, hw[1] + 2 - k[1] + 1  # padding 1, stride 1, dilation 1
    x = torch.randn(n, c_in, *hw).to(dtype)
    w = torch.randn(c_out, c_in // groups, *scope).to(dtype)
    kind = cfg.get("kernel", "local")
    dk = {"local": lambda: torch.randn(n, 2 * gk * K, ho, wo), "global": lambda: torch.randn(n, 2 * gk * K),
          None: lambda: None}[kind]()
    dk = None if dk is None else dk.to(dtype)
    off = None if gi is None else torch.randn(n, 2 * gi * K, ho, wo).to(dtype)
    mask = torch.rand(n, (gm or gi or 1) * K, ho, wo).to(dtype) if cfg.get("mask") else None
    b = torch.randn(c_out).to(dtype) if cfg.get("bias", True) else None
    return [x, w, dk, off, mask, b], (*k, 1, 1, 1, 1, 1, 1, groups), (n, c_out, ho, wo)


def _signature(fn, args, meta) -> Tuple[Dict[str, str], Dict[str, object]]:
    names = list(fn.arg_names)
    sig, consts = {}, {}
    values = dict(zip(names, args))
    values.update(meta)
    for name in names:
        v = values[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _DTYPES[v.dtype]
        elif isinstance(v, bool) or not isinstance(v, int) or name in meta:
            sig[name] = "constexpr"
            consts[name] = v
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
    return sig, consts


def record_launches(cases=CASES, dtypes=(torch.float32,), kernel_size=(3, 3)) -> List[tuple]:
    """Distinct (kernel name, signature, constexprs) the host code launches for ``cases`` x ``dtypes``."""
    from . import _impl

    kernels = _impl.kernels()
    if kernels.INTERPRETED:
        raise RuntimeError("aot_check must run without TRITON_INTERPRET")
    seen, out = set(), []

    def fake_launch(name, grid, *args, **meta):
        fn = getattr(kernels, name)
        sig, consts = _signature(fn, args, meta)
        key = (name, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())))
        if key not in seen:
            seen.add(key)
            out.append((name, sig, consts))

    saved = _impl._launch, _impl._check_device
    _impl._launch, _impl._check_device = fake_launch, lambda t: None
    try:
        for dtype in dtypes:
            for cfg in cases:
                args, sizes, out_shape = _case_args(cfg, dtype, kernel_size)
                _impl.forward(*args, *sizes)
                grad = torch.randn(out_shape).to(dtype)
                need = [True, True, args[2] is not None, args[3] is not None, args[4] is not None, True]
                _impl.backward(grad, *args[:5], *sizes, need)
    finally:
        _impl._launch, _impl._check_device = saved
    return out


def compile_all(launches, targets=(90,)) -> List[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _impl

    kernels = _impl.kernels()
    failures = []
    for name, sig, consts in launches:
        fn = getattr(kernels, name)
        for cc in targets:
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                triton.compile(src, target=GPUTarget("cuda", cc, 32))
            except Exception as exc:  # noqa: BLE001 - reported
                first = str(exc).strip().splitlines()
                failures.append(f"sm_{cc} {name} {consts}: {type(exc).__name__}: {first[-1] if first else ''}"[:800])
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="80,90")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,float64")
    ap.add_argument("--quick", action="store_true", help="float32 and float64 for sm_90 only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    targets = [90] if args.quick else [int(t) for t in args.targets.split(",")]
    dtypes = [torch.float32, torch.float64] if args.quick else [getattr(torch, d) for d in args.dtypes.split(",")]
    t0 = time.time()
    launches = record_launches(dtypes=dtypes)
    failures = compile_all(launches, targets)
    print(f"aot_check: {len(launches)} kernel specializations x {len(targets)} targets "
          f"(sm_{', sm_'.join(map(str, targets))}), {len(failures)} failures, {time.time() - t0:.0f} s")
    for f in failures:
        print("  FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
