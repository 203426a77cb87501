"""Speed and peak memory of the DK operator: native kernels against the natural alternatives.

For each shape, forward and forward+backward (gradients of input, weight and every
offset) of:

* DK (local kernel offsets), DK+DCN (kernel and image offsets), DCN (scope = kernel,
  image offsets), each through the native op (``torch.ops.dk_ops``) and, on CUDA, through the
  Triton op (``torch.ops.dk_ops_triton``; the default CUDA backend; the native CUDA C++ rows only
  where that extension is built); for depthwise shapes also with channels-last tensors (what a
  channels-last model passes; own CPU kernels);
* the same three through the pure-PyTorch reference path (``--no-reference`` skips);
* ``F.conv2d`` with the k x k kernel (same groups; cuDNN on GPU; depthwise also channels-last)
  and with the full
  S x S scope kernel (the dense convolution DK's general-groups GEMM competes with);
* ``torchvision.ops.deform_conv2d`` for DCN, when torchvision is importable.

Times are medians of ``--repeat`` runs after ``--warmup`` (CUDA: events around each
run). Peak memory is the peak allocated during one call above what was in use
before it: CUDA ``torch.cuda.max_memory_allocated``; CPU the process's resident-set
high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above its
resident set before the call, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors return to the OS between calls (the script re-executes itself with it).

    python benchmarks/bench_ops.py                    # CPU, reduced default shapes
    python benchmarks/bench_ops.py --device cuda      # the issue's shapes
    python benchmarks/bench_ops.py --json out.json --markdown out.md
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dk_ops import backend  # noqa: E402
from dk_ops.reference import deform_kernel_conv2d_reference  # noqa: E402

# name: (N, C_in, C_out, H, W, groups); k = 3, S = 4 (the paper's local DK).
SHAPES_FULL = {
    "dw-paper": (32, 256, 256, 56, 56, 256),
    "dw-112": (8, 64, 64, 112, 112, 64),
    "general-g1": (8, 64, 64, 56, 56, 1),
}
# CPU defaults: same channel counts and groups, smaller batches.
SHAPES_CPU = {
    "dw-paper": (2, 256, 256, 56, 56, 256),
    "dw-112": (1, 64, 64, 112, 112, 64),
    "general-g1": (1, 64, 64, 56, 56, 1),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def peak_memory(fn: Callable[[], None], device) -> Optional[int]:
    """Peak bytes allocated by one call of fn above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    # CPU: the resident-set high-water mark (reset through /proc/self/clear_refs) above the
    # resident set before the call; MALLOC_MMAP_THRESHOLD_ (set by main) makes freed
    # tensors go back to the OS, so every call starts from the same state.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _proc_status()["VmRSS"]
    fn()
    return max(0, _proc_status()["VmHWM"] - before)


def make_inputs(shape, device, dtype, variant: str, k=3, S=4, seed=0):
    n, c_in, c_out, h, w, groups = shape
    g = torch.Generator().manual_seed(seed)
    K = k * k
    scope = k if variant == "dcn" else S
    x = torch.randn(n, c_in, h, w, generator=g).to(device, dtype)
    weight = (torch.randn(c_out, c_in // groups, scope, scope, generator=g) * 0.1).to(device, dtype)
    dk = off = None
    if variant in ("dk", "dk+dcn"):
        dk = (torch.randn(n, 2 * K, h, w, generator=g) * 0.5).to(device, dtype)
    if variant in ("dcn", "dk+dcn"):
        off = torch.randn(n, 2 * K, h, w, generator=g).to(device, dtype)
    return x, weight, dk, off


def bench_case(label, fn_forward, tensors, device, warmup, repeat, measure_memory=True):
    """fn_forward(*tensors) -> output; returns times and peak memories for fwd and fwd+bwd."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    plain = [t.detach() for t in tensors]

    def fwd():
        with torch.no_grad():
            fn_forward(*plain)

    def fwd_bwd():
        out = fn_forward(*leaves)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    row = {"method": label, "fwd_s": time_fn(fwd, device, warmup, repeat),
           "fwdbwd_s": time_fn(fwd_bwd, device, warmup, repeat)}
    if measure_memory:
        row["fwd_peak_bytes"] = peak_memory(fwd, device)
        row["fwdbwd_peak_bytes"] = peak_memory(fwd_bwd, device)
    return row


def dk_call(impl: str, k=3, pad=1):
    def native(x, w, dk=None, off=None):
        return torch.ops.dk_ops.deform_kernel_conv2d(x, w, dk, off, None, None, k, k, 1, 1, pad, pad, 1, 1,
                                                     w_groups(x, w))

    def reference(x, w, dk=None, off=None):
        return deform_kernel_conv2d_reference(x, w, dk, off, None, None, (k, k), (1, 1), (pad, pad), (1, 1),
                                              w_groups(x, w))

    def triton(x, w, dk=None, off=None):
        return torch.ops.dk_ops_triton.deform_kernel_conv2d(x, w, dk, off, None, None, k, k, 1, 1, pad, pad, 1, 1,
                                                            w_groups(x, w))

    return {"native": native, "reference": reference, "triton": triton}[impl]


def channels_last(t):
    """4-D activations and offsets in channels-last format (a depthwise weight is both formats)."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def w_groups(x, w):
    return x.shape[1] // w.shape[1]


def run_shape(name, shape, device, dtype, args) -> List[Dict]:
    rows = []
    n, c_in, c_out, h, w, groups = shape
    k, S = 3, 4
    variants = {"dk": "DK", "dk+dcn": "DK+DCN", "dcn": "DCN"}
    depthwise = groups == c_in == c_out
    for variant, vlabel in variants.items():
        x, weight, dk, off = make_inputs(shape, device, dtype, variant)
        tensors = [t for t in (x, weight, dk, off) if t is not None]

        def split(fn, has_dk=dk is not None, has_off=off is not None):
            def call(*ts):
                ts = list(ts)
                xx, ww = ts[0], ts[1]
                d = ts[2] if has_dk else None
                o = ts[2 + int(has_dk)] if has_off else None
                return fn(xx, ww, d, o)
            return call

        impls = list(args.impls) + ([] if args.no_reference else ["reference"])
        for impl in impls:
            if impl == "reference" and variant != "dk" and not args.all_reference:
                continue
            label = f"{vlabel} {impl}"
            warmup, repeat = args.warmup, args.repeat
            if impl == "reference":  # minutes per call on the CPU for general groups
                warmup = 0 if device.type == "cpu" else 1
                repeat = min(repeat, args.reference_repeat or (1 if device.type == "cpu" else 5))
            try:
                rows.append(bench_case(label, split(dk_call(impl)), tensors, device, warmup, repeat))
            except RuntimeError as exc:  # e.g. out of memory for the reference path
                rows.append({"method": label, "error": str(exc).splitlines()[0][:200]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if depthwise:  # what a channels-last model hands the op (its own CPU kernels)
            for impl in args.impls:
                rows.append(bench_case(f"{vlabel} {impl}, channels-last", split(dk_call(impl)),
                                       [channels_last(t) for t in tensors], device, args.warmup, args.repeat))
    # Baselines.
    x, weight, _, off = make_inputs(shape, device, dtype, "dcn")
    wk = weight  # k x k
    rows.append(bench_case(f"F.conv2d {k}x{k} (groups={groups})",
                           lambda a, b: F.conv2d(a, b, padding=1, groups=groups), [x, wk], device, args.warmup,
                           args.repeat))
    if depthwise:
        rows.append(bench_case(f"F.conv2d {k}x{k} (groups={groups}), channels-last",
                               lambda a, b: F.conv2d(a, b, padding=1, groups=groups),
                               [channels_last(x), channels_last(wk)], device, args.warmup, args.repeat))
    ws = (torch.randn(c_out, c_in // groups, S, S, generator=torch.Generator().manual_seed(1)) * 0.1).to(device,
                                                                                                         dtype)
    rows.append(bench_case(f"F.conv2d scope {S}x{S} (groups={groups})",
                           lambda a, b: F.conv2d(F.pad(a, (1, 2, 1, 2)), b, groups=groups), [x, ws], device,
                           args.warmup, args.repeat))
    try:
        from torchvision.ops import deform_conv2d
    except Exception:
        deform_conv2d = None
    if deform_conv2d is not None:
        rows.append(bench_case("torchvision deform_conv2d (DCN)",
                               lambda a, b, o: deform_conv2d(a, o, b, padding=1), [x, wk, off], device,
                               args.warmup, args.repeat))
    for r in rows:
        r["shape"] = name
        r["dims"] = f"N={n} C_in={c_in} C_out={c_out} {h}x{w} groups={groups} k={k} S={S}"
    return rows


def fmt_ms(s):
    return f"{s * 1e3:.2f}" if s is not None else "-"


def fmt_mb(b):
    return f"{b / 2**20:.1f}" if b is not None else "-"


def to_markdown(rows: List[Dict], meta: Dict) -> str:
    out = [f"device: {meta['device']}; dtype {meta['dtype']}; torch {meta['torch']}; threads {meta['threads']}; "
           f"median of {meta['repeat']} runs ({meta.get('reference_runs', meta['repeat'])} for the reference path)",
           f"command: `{meta['command']}`", ""]
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    for s in shapes:
        rs = [r for r in rows if r["shape"] == s]
        out.append(f"**{s}**: {rs[0]['dims']}")
        out.append("")
        out.append("| method | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |")
        out.append("|---|---:|---:|---:|---:|")
        for r in rs:
            if "error" in r:
                out.append(f"| {r['method']} | error: {r['error']} | | | |")
                continue
            out.append(f"| {r['method']} | {fmt_ms(r['fwd_s'])} | {fmt_ms(r['fwdbwd_s'])} | "
                       f"{fmt_mb(r.get('fwd_peak_bytes'))} | {fmt_mb(r.get('fwdbwd_peak_bytes'))} |")
        by = {r["method"]: r for r in rs if "error" not in r}
        notes = []
        nat, ref = by.get("DK native"), by.get("DK reference")
        if nat and ref:
            notes.append(f"DK native vs reference: {ref['fwd_s'] / nat['fwd_s']:.1f}x faster fwd, "
                         f"{ref['fwdbwd_s'] / nat['fwdbwd_s']:.1f}x faster fwd+bwd; peak memory "
                         f"{nat['fwd_peak_bytes'] / max(ref['fwd_peak_bytes'], 1):.2f}x (fwd), "
                         f"{nat['fwdbwd_peak_bytes'] / max(ref['fwdbwd_peak_bytes'], 1):.2f}x (fwd+bwd) of the reference")
        conv = next((r for m, r in by.items() if m.startswith("F.conv2d 3x3")), None)
        scope = next((r for m, r in by.items() if m.startswith("F.conv2d scope")), None)
        if nat and conv:
            notes.append(f"DK native / conv2d 3x3: {nat['fwd_s'] / conv['fwd_s']:.1f}x (fwd), "
                         f"{nat['fwdbwd_s'] / conv['fwdbwd_s']:.1f}x (fwd+bwd)")
        if nat and scope:
            notes.append(f"DK native / conv2d with the scope kernel: {nat['fwd_s'] / scope['fwd_s']:.1f}x (fwd), "
                         f"{nat['fwdbwd_s'] / scope['fwdbwd_s']:.1f}x (fwd+bwd)")
        nat_cl = by.get("DK native, channels-last")
        conv_cl = next((r for m, r in by.items() if m.startswith("F.conv2d 3x3") and m.endswith("channels-last")), None)
        if nat_cl and conv_cl:
            notes.append(f"channels-last: DK native / conv2d 3x3: {nat_cl['fwd_s'] / conv_cl['fwd_s']:.1f}x (fwd), "
                         f"{nat_cl['fwdbwd_s'] / conv_cl['fwdbwd_s']:.1f}x (fwd+bwd)")
        tv, dcn = by.get("torchvision deform_conv2d (DCN)"), by.get("DCN native")
        if tv and dcn:
            notes.append(f"DCN native vs torchvision deform_conv2d: {tv['fwd_s'] / dcn['fwd_s']:.1f}x faster fwd, "
                         f"{tv['fwdbwd_s'] / dcn['fwdbwd_s']:.1f}x faster fwd+bwd")
        notes.extend(triton_notes(by))
        out.append("")
        out.extend(f"- {n}" for n in notes)
        out.append("")
    return "\n".join(out)


def triton_notes(by: Dict[str, Dict]) -> List[str]:
    """The Triton rows against their baselines and the GPU targets (DK fwd+bwd <= 2x cuDNN's depthwise
    conv2d, DCN >= 20x faster than torchvision's deform_conv2d, general-groups DK <= 2.5x the dense
    scope-kernel conv2d)."""
    out = []
    tri = by.get("DK triton")
    if tri is None:
        return out
    conv = next((r for m, r in by.items() if m.startswith("F.conv2d 3x3") and not m.endswith("channels-last")), None)
    scope = next((r for m, r in by.items() if m.startswith("F.conv2d scope")), None)
    ref = by.get("DK reference")
    if ref:
        out.append(f"DK triton vs reference: {ref['fwd_s'] / tri['fwd_s']:.1f}x faster fwd, "
                   f"{ref['fwdbwd_s'] / tri['fwdbwd_s']:.1f}x faster fwd+bwd")
    if conv:
        r = tri["fwdbwd_s"] / conv["fwdbwd_s"]
        out.append(f"DK triton / conv2d 3x3: {tri['fwd_s'] / conv['fwd_s']:.2f}x (fwd), {r:.2f}x (fwd+bwd)"
                   + (f"; depthwise target <= 2x fwd+bwd: {'met' if r <= 2 else 'NOT met'}"
                      if "groups=1)" not in conv["method"] else ""))
    if scope:
        r = tri["fwdbwd_s"] / scope["fwdbwd_s"]
        out.append(f"DK triton / conv2d with the scope kernel: {tri['fwd_s'] / scope['fwd_s']:.2f}x (fwd), "
                   f"{r:.2f}x (fwd+bwd)" + (f"; general-groups target <= 2.5x fwd+bwd: {'met' if r <= 2.5 else 'NOT met'}"
                                            if "groups=1)" in scope["method"] else ""))
    tv, dcn = by.get("torchvision deform_conv2d (DCN)"), by.get("DCN triton")
    if tv and dcn:
        r = tv["fwdbwd_s"] / dcn["fwdbwd_s"]
        out.append(f"DCN triton vs torchvision deform_conv2d: {tv['fwd_s'] / dcn['fwd_s']:.1f}x faster fwd, "
                   f"{r:.1f}x faster fwd+bwd; target >= 20x: {'met' if r >= 20 else 'NOT met'}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES_FULL))
    ap.add_argument("--full", action="store_true", help="the issue's full shapes on CPU too")
    ap.add_argument("--batch", type=int, default=None, help="override N for every shape")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference path")
    ap.add_argument("--all-reference", action="store_true", help="reference for DK+DCN and DCN too")
    ap.add_argument("--reference-repeat", type=int, default=None,
                    help="timed runs of the slow reference path (default 1 on the CPU, without warm-up; 5 on CUDA)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = 5 if device.type == "cuda" else 1
    if args.repeat is None:
        args.repeat = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        # The Triton op (the default CUDA backend) and, where that extension is already built (never
        # compiled here), the CUDA C++ one.
        native_ok = (backend._native.cached_build_exists() and backend.load_native()
                     and backend._native.has_cuda())
        args.impls = [impl for impl, ok in (("triton", backend.load_triton()), ("native", native_ok)) if ok]
        if "triton" in args.impls:
            from dk_ops.triton import selfcheck

            if not selfcheck.passed(device):  # the op would run the reference path: not a Triton row
                print(f"Triton failed its self-check on {device}: {selfcheck.result(device)}", file=sys.stderr)
                args.impls.remove("triton")
        if not args.impls:
            print(f"no GPU kernels for {device}:", backend.backend_info(), file=sys.stderr)
            return 1
    else:
        if not backend.load_native():
            print("native kernels unavailable:", backend.backend_info(), file=sys.stderr)
            return 1
        if backend.selected_backend(device) != "native":
            print(f"no native kernels for {device}:", backend.backend_info(), file=sys.stderr)
            return 1
        args.impls = ["native"]
    table = SHAPES_FULL if (device.type == "cuda" or args.full) else SHAPES_CPU
    names = args.shapes.split(",") if args.shapes else list(table)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeat": args.repeat, "command": "python " + " ".join(sys.argv),
            "reference_runs": min(args.repeat, args.reference_repeat or (1 if device.type == "cpu" else 5))}
    rows = []
    for name in names:
        shape = table[name]
        if args.batch:
            shape = (args.batch,) + shape[1:]
        t0 = time.time()
        rows.extend(run_shape(name, shape, device, dtype, args))
        print(f"[{name}] done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    md = to_markdown(rows, meta)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
