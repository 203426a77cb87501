"""Correctness of the Triton backend on a CUDA device (run by scripts/gpu_check.sh; needs a GPU and a
checkout: it reuses the CPU suite's argument grid from tests/dk_ops/test_native.py).

    python -m dk_ops.triton.gpu_check [--quick] [--json out.json]
    TRITON_INTERPRET=1 python -m dk_ops.triton.gpu_check --device cpu --quick   # a dry run of this script

Every case runs the Triton op on CUDA and compares it with the reference path computed in float64 on
the CPU from the same (rounded) inputs: values and every gradient, tolerances relative to each
tensor's scale (float64 1e-9; float32 1e-4 with TF32 off; float16 1e-2; bfloat16 5e-2). Sections:
the first-use self-check, the grid in float64 and float32 with NaN-poisoned buffers, float16 and
bfloat16, channels-last / non-contiguous / batch 0, larger shapes (several programs per axis),
bitwise-repeatable weight gradients, opcheck, torch.compile(fullgraph=True) with inductor,
torch.export, and float16/bfloat16 error at the benchmark's depthwise shape. Prints one line per
section and exits 1 when any fails.
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NAMES = ["input", "weight", "kernel_offset", "offset", "mask", "bias"]


def _flat(sizes):
    return (*sizes["kernel_size"], *sizes["stride"], *sizes["padding"], *sizes["dilation"], sizes["groups"])


def _op(args, sizes):
    return torch.ops.dk_ops_triton.deform_kernel_conv2d(*args, *_flat(sizes))


def _ref(args, sizes):
    from dk_ops.reference import deform_kernel_conv2d_reference

    return deform_kernel_conv2d_reference(*args, sizes["kernel_size"], sizes["stride"], sizes["padding"],
                                          sizes["dilation"], sizes["groups"])


def _values_and_grads(fn, args, sizes, go=None):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    y = fn(leaves, sizes)
    if go is None:
        go = torch.randn(y.shape, dtype=y.dtype, device="cpu").to(y.device)
    live = [a for a in leaves if a is not None]
    grads = torch.autograd.grad(y, live, go.to(y.device, y.dtype), allow_unused=True) if y.numel() else [None] * len(
        live)
    return y, list(grads), go


DEVICE = "cuda"


def compare(args, sizes, dtype, tol, device=None, transform=None) -> float:
    """Triton on ``device`` in ``dtype`` against the float64 CPU reference; returns the worst error
    relative to scale; raises AssertionError past ``tol``."""
    device = device or DEVICE
    low = [None if a is None else a.to("cpu", dtype) for a in args]
    dev = [None if a is None else a.to(device) for a in low]
    if transform is not None:
        dev = transform(dev)
    y, g, go = _values_and_grads(_op, dev, sizes)
    ref_in = [None if a is None else a.double() for a in low]
    if dtype in (torch.float16, torch.bfloat16):
        # Rounded offsets land exactly on pixels, where grid_sample's normalised coordinates may take the
        # other one-sided derivative than the kernels' floor(): evaluate the reference just to the right.
        ref_in = [a + 1e-10 if a is not None and i in (2, 3) else a for i, a in enumerate(ref_in)]
    y_r, g_r, _ = _values_and_grads(_ref, ref_in, sizes, go.cpu().double())
    names = ["output"] + [n for n, a in zip(NAMES, args) if a is not None]
    worst = 0.0
    for nm, a, b in zip(names, [y] + g, [y_r] + g_r):
        a = a.detach().cpu().double()
        b = torch.zeros_like(a) if b is None else b
        scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-6)
        if not torch.isfinite(a).all():
            raise AssertionError(f"{nm}: non-finite values")
        err = (a - b).abs().max().item() / scale if a.numel() else 0.0
        worst = max(worst, err)
        if err > tol:
            raise AssertionError(f"{nm}: max error {err:.2e} of scale > {tol:.0e}")
    return worst


def _section(name: str, fn: Callable[[], str], results: List[Dict]) -> None:
    t0 = time.time()
    try:
        detail = fn() or ""
        ok = True
    except Exception as exc:  # noqa: BLE001 - reported
        ok = False
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        traceback.print_exc()
    results.append({"section": name, "ok": ok, "detail": detail, "seconds": round(time.time() - t0, 1)})
    print(f"[{'ok' if ok else 'FAIL'}] {name} ({time.time() - t0:.0f} s) {detail}", flush=True)


class _Context:
    """What the sections share: the dry-run flag, the argument grid and its builders, the Triton modules."""

    def __init__(self, dry: bool, quick: bool) -> None:
        from dk_ops import triton as dk_triton
        from dk_ops.triton import _impl, selfcheck
        from tests.dk_ops.test_native import GRID, _ids, make

        self.dry, self.grid = dry, GRID[::3] if quick else GRID
        self.make, self.ids = make, _ids
        self.dk_triton, self.impl, self.selfcheck = dk_triton, _impl, selfcheck


def _info(ctx: "_Context") -> str:
    assert ctx.dk_triton.load(), ctx.dk_triton.status()
    if ctx.dry:
        return f"torch {torch.__version__}, triton {ctx.dk_triton.status()['version']}, interpreter dry run"
    return (f"torch {torch.__version__}, triton {ctx.dk_triton.status()['version']}, "
            f"{torch.cuda.get_device_name(0)} sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}")


def _self_check(ctx: "_Context") -> str:
    if ctx.dry:
        ctx.selfcheck.CHECKED_DEVICE_TYPES.add("cpu")
    r = ctx.selfcheck.run("cpu" if ctx.dry else "cuda:0")
    assert r["ok"], r["detail"]
    return r["detail"]


def _grid_dtype(ctx: "_Context", dtype: torch.dtype, tol: float) -> str:
    ctx.impl.POISON = True  # NaN-filled buffers: a kernel that leaves an element unwritten shows
    try:
        worst = {}
        for cfg in ctx.grid:
            a, s = ctx.make(**cfg)
            worst[ctx.ids(cfg)] = compare(a, s, dtype, tol)
    finally:
        ctx.impl.POISON = False
    return f"{len(worst)} configs, worst {max(worst.values()):.1e} of scale"


def _reduced(ctx: "_Context") -> str:
    out = []
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        for cfg in (dict(), dict(groups=2, gk=2, gi=2, mask=True), dict(groups=4, kernel="global"),
                    dict(groups=1, c_out=6, gk=3, gi=2, scope=(5, 3), k=(3, 2))):
            a, s = ctx.make(scale=0.7, **cfg)
            out.append(compare(a, s, dtype, tol))
    return f"worst {max(out):.1e} of scale"


def _formats(ctx: "_Context") -> str:
    a, s = ctx.make(gi=1, mask=True, groups=2, gk=2)

    def nc(t):
        return [t[0].to(memory_format=torch.channels_last), t[1].transpose(2, 3).contiguous().transpose(2, 3),
                t[2].transpose(2, 3).contiguous().transpose(2, 3), t[3].to(memory_format=torch.channels_last),
                t[4].transpose(2, 3).contiguous().transpose(2, 3), t[5]]
    e1 = compare(a, s, torch.float64, 1e-9, transform=nc)
    a, s = ctx.make(groups=4, gi=2, mask=True)
    cl = [t.to(memory_format=torch.channels_last) if t is not None and t.dim() == 4 and i != 1 else t
          for i, t in enumerate(a)]
    y = _op([t.to(DEVICE) for t in cl[:5]] + [cl[5].to(DEVICE)], s)
    assert y.is_contiguous(memory_format=torch.channels_last), "channels-last output expected"
    e2 = compare(a, s, torch.float64, 1e-9, transform=lambda d: [
        t.to(memory_format=torch.channels_last) if t is not None and t.dim() == 4 and i != 1 else t
        for i, t in enumerate(d)])
    a, s = ctx.make(n=0, gi=1, mask=True, groups=2, gk=2)
    leaves = [t.to(DEVICE).requires_grad_() for t in a]
    y = _op(leaves, s)
    y.sum().backward()
    assert y.shape[0] == 0 and torch.all(leaves[1].grad == 0)
    return f"non-contiguous {e1:.1e}, channels-last {e2:.1e}, batch 0 ok"


def _larger(ctx: "_Context") -> str:
    out = []
    for cfg in (dict(n=3, c_in=64, c_out=64, groups=64, gk=2, gi=4, mask=True, hw=(33, 35)),
                dict(n=3, c_in=32, c_out=64, groups=32, gk=1, kernel="global", hw=(31, 30)),
                dict(n=2, c_in=32, c_out=48, groups=2, gk=3, gi=2, mask=True, hw=(21, 19), stride=(2, 1)),
                dict(n=2, c_in=32, c_out=32, groups=1, kernel="global", gi=1, hw=(20, 22))):
        a, s = ctx.make(**cfg)
        out.append(compare(a, s, torch.float64, 1e-9))
    return f"worst {max(out):.1e} of scale"


def _deterministic(ctx: "_Context") -> str:
    msgs = []
    big = 1 if ctx.dry else 8
    for cfg in (dict(n=4, c_in=8 * big, c_out=8 * big, groups=8 * big, gi=1, mask=True, hw=(5 * big, 5 * big)),
                dict(n=4, c_in=2 * big, c_out=2 * big, groups=2, gk=2, hw=(3 * big, 3 * big))):
        a, s = ctx.make(dtype=torch.float32, **cfg)
        dev = [None if t is None else t.to(DEVICE) for t in a]
        _, g1, go = _values_and_grads(_op, dev, s)
        _, g2, _ = _values_and_grads(_op, dev, s, go)
        assert torch.equal(g1[1], g2[1]), "weight gradient differs between two runs"
        msgs.append("input grad " + ("bitwise equal" if torch.equal(g1[0], g2[0]) else
                                     "differs (atomics with image offsets)"))
    return "weight gradients bitwise equal; " + "; ".join(msgs)


def _opcheck(ctx: "_Context") -> str:
    for cfg in (dict(), dict(groups=2, gk=2, gi=2, mask=True), dict(kernel="global", groups=4),
                dict(kernel=None, mask=True, bias=False)):
        a, s = ctx.make(n=1, hw=(5, 4), **cfg)
        a = [None if t is None else t.to(DEVICE) for t in a]
        torch.library.opcheck(torch.ops.dk_ops_triton.deform_kernel_conv2d.default,
                              tuple(None if t is None else t.requires_grad_() for t in a) + _flat(s))
        y = _op(a, s).detach()
        need = [True, True] + [t is not None for t in a[2:]]
        torch.library.opcheck(torch.ops.dk_ops_triton._deform_kernel_conv2d_backward.default,
                              (torch.randn_like(y),) + tuple(None if t is None else t.detach() for t in a[:5])
                              + _flat(s) + (need,))
    return "4 configs, forward and backward ops"


def _compiled(ctx: "_Context") -> str:
    from dk_ops.modules import DeformKernel2d

    torch._dynamo.reset()
    layer = DeformKernel2d(8, 8, 3, padding=1, groups=8).to(DEVICE)
    with torch.no_grad():
        layer.kernel_offset_generator.weight.normal_(0, 0.1)
    x = torch.randn(2, 8, 12, 12, device=DEVICE, requires_grad=True)
    eager = layer(x)
    ge = torch.autograd.grad(eager.square().sum(), [x, layer.weight])
    f = torch.compile(layer, fullgraph=True, backend="aot_eager" if ctx.dry else "inductor")
    y = f(x)
    gc = torch.autograd.grad(y.square().sum(), [x, layer.weight])
    torch.testing.assert_close(y, eager, rtol=1e-4, atol=1e-4)
    for p, q in zip(gc, ge):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    return ("aot_eager" if ctx.dry else "inductor") + ", fullgraph, forward and backward"


def _exported(ctx: "_Context") -> str:
    import dk_ops.models as zoo

    model = zoo.create("study_net", op="dk", widths=(8, 16), num_classes=3).to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    prog = torch.export.export(model, (x,))
    targets = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert any("dk_ops_triton.deform_kernel_conv2d" in t for t in targets), targets
    torch.testing.assert_close(prog.module()(x), model(x))
    return "study_net (dk) exported with the Triton op"


def _reduced_error_at_scale(ctx: "_Context") -> str:
    out = []
    g = torch.Generator().manual_seed(0)
    n, c, h, k, S = 4, 256, 56, 3, 4
    x = torch.randn(n, c, h, h, generator=g)
    w = torch.randn(c, 1, S, S, generator=g) * 0.3
    dk = torch.randn(n, 2 * k * k, h, h, generator=g) * 0.5
    sizes = dict(kernel_size=(k, k), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=c)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        low = [t.to(dtype) for t in (x, w, dk)]
        y = _op([t.to(DEVICE) for t in low] + [None, None, None], sizes).float().cpu()
        y_r = _ref([t.double() for t in low] + [None, None, None], sizes)
        out.append(f"{str(dtype).split('.')[-1]} {((y.double() - y_r).norm() / y_r.norm()).item():.1e}")
    return "relative L2 error of the output at N=4 C=256 56x56 (depthwise DK, S=4): " + ", ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a third of the grid, no compile/export")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 (small sections only)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    dry = DEVICE == "cpu"
    if dry:
        import os

        os.environ["DK_OPS_BACKEND"] = "triton"  # CPU tensors run the Triton op only when forced (and interpreted)
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import dk_ops

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: List[Dict] = []
    torch.manual_seed(0)
    ctx = _Context(dry, args.quick)
    sections = [("environment", _info), ("self-check", _self_check),
                ("grid float64 (poisoned buffers)", lambda c: _grid_dtype(c, torch.float64, 1e-9)),
                ("grid float32 (poisoned buffers, TF32 off)", lambda c: _grid_dtype(c, torch.float32, 1e-4)),
                ("float16 / bfloat16", _reduced), ("memory formats and batch 0", _formats),
                ("larger shapes", None if dry else _larger), ("deterministic weight gradients", _deterministic),
                ("opcheck", _opcheck), ("torch.compile", _compiled if not args.quick or dry else None),
                ("torch.export", _exported if not args.quick or dry else None),
                ("reduced precision error at scale", None if dry else _reduced_error_at_scale)]
    for name, fn in sections:
        if fn is not None:
            _section(name, lambda fn=fn: fn(ctx), results)
    info_lines = dk_ops.backend_info()
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "backend_info": info_lines}, indent=1))
    failed = [r["section"] for r in results if not r["ok"]]
    print(f"gpu_check: {len(results) - len(failed)}/{len(results)} sections passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
