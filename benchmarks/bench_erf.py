"""ERF engine vs the RepLKNet protocol loop, in the same run, on the same model, layer, unit and images.

The baseline is a plain restatement of RepLKNet's erf/visualize_erf.py: batch 1, the full forward
(the layer's output caught by a hook, the head still runs), ``relu(y[:, :, u]).sum()``, one
``autograd.grad``, ``relu(grad).sum((0, 1))``, a host copy and a NaN check per image, a running mean.
The engine is :func:`erf_lab.compute_erf` with its defaults (auto-sized batches, forward stopped at
the layer, BatchNorm folded into its conv, channels-last on CPU, a crop around the unit's receptive field and its cone when the graph says that
is exact, verified on the first batch at the cost of one batch-1 forward). Each side runs in its own
subprocess so its peak memory (max RSS on CPU, max allocated on CUDA) is its own; maps must agree
to relative L1 < 1e-4. Both wall-clock and CPU-time ratios are reported: on a shared CPU the
wall clock swings with other load, the process CPU time much less.

    python benchmarks/bench_erf.py                 # all cases, CPU
    python benchmarks/bench_erf.py --quick         # small sizes (a smoke run)
    python benchmarks/bench_erf.py --device cuda --cases b224
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (image side, images, layer, description)
CASES = {
    "b1024": (1024, 8, "layer4", "RepLKNet protocol 1024x1024, last stage"),
    "b224": (224, 32, "layer4", "224x224, last stage"),
    "early": (224, 32, "layer1", "224x224, early layer (layer1)"),
}
QUICK = {"b1024": (384, 2, "layer4"), "b224": (160, 4, "layer4"), "early": (160, 4, "layer1")}


def _model(device):
    import torch
    from dk_ops import models

    torch.manual_seed(0)
    return models.create("resnet50_dw", op="conv").eval().to(device)


def _images(side, n):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, side, side, generator=g)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to other load on a shared CPU."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    """One side of one case; writes {seconds, peak_mb, map path} as JSON."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _model(device)
    images = _images(args.side, args.n)
    layer = dict(model.named_modules())[args.layer]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from erf_lab import compute_erf

    # the unit: the engine's centre unit (for these maps equal to RepLKNet's H'//2, W'//2)
    probe = compute_erf(model, images[:1], layer=args.layer, progress=False, crop=False, device=device)
    unit = tuple(probe.meta["unit"])
    _sync(device)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    if args.mode == "baseline":
        feats = {}
        handle = layer.register_forward_hook(lambda m, i, o: feats.__setitem__("y", o))
        total, count = None, 0
        for img in images:
            samples = img[None].to(device).requires_grad_(True)
            model(samples)
            outputs = feats["y"]
            central_point = F.relu(outputs[:, :, unit[0], unit[1]]).sum()
            grad = torch.autograd.grad(central_point, samples)[0]
            grad = F.relu(grad)
            aggregated = grad.sum((0, 1))
            grad_map = aggregated.cpu().numpy().astype(np.float64)
            if np.isnan(np.sum(grad_map)):
                continue
            total = grad_map if total is None else total + grad_map
            count += 1
        handle.remove()
        erf, meta = total / count, {}
    else:
        kw = dict(layer=args.layer, unit=unit, device=device, progress=False,
                  batch_size=args.batch_size if args.batch_size == "auto" else int(args.batch_size),
                  channels_last={"auto": "auto", "on": True, "off": False}[args.channels_last])
        if args.mode == "full_forward":
            kw.update(stop_at_layer=False, crop=False)
        r = compute_erf(model, images, **kw)
        erf, meta = r.map, {"crop": r.meta["crop"], "locality": r.meta["locality"], "cone": r.meta["cone"],
                            "channels_last": r.meta["channels_last"], "batch_size": r.meta["batch_size_used"],
                            "bn_folded": r.meta["bn_folded"]}
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    np.save(args.map_out, erf)
    Path(args.json_out).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak, "unit": unit, **meta}))


def run_side(case, side, n, layer, mode, args, tmp):
    stem = Path(tmp) / f"{case}_{mode}"
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--side", str(side), "--n", str(n), "--layer", layer,
           "--device", args.device, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--map-out", f"{stem}.npy", "--json-out", f"{stem}.json"]
    cmd += ["--channels-last", args.channels_last]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    import numpy as np

    return json.loads(Path(f"{stem}.json").read_text()), np.load(f"{stem}.npy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="engine", choices=["baseline", "engine", "full_forward"])
    ap.add_argument("--side", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--layer")
    ap.add_argument("--map-out")
    ap.add_argument("--json-out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", default="auto", help="the engine's batch (default: compute_erf's own choice)")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                    help="the engine's memory format (default: compute_erf's own choice, channels-last on CPU)")
    ap.add_argument("--cases", default="b1024,b224,early")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not the README numbers")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            side, n, layer = (QUICK[case] if args.quick else CASES[case][:3])
            # early layer: the comparison is against the same engine with the full forward
            ref_mode = "full_forward" if case == "early" else "baseline"
            ref, ref_map = run_side(case, side, n, layer, ref_mode, args, tmp)
            eng, eng_map = run_side(case, side, n, layer, "engine", args, tmp)
            rel_l1 = float(np.abs(eng_map - ref_map).sum() / np.abs(ref_map).sum())
            row = {
                "case": case, "side": side, "images": n, "layer": layer, "reference": ref_mode,
                "ref_img_s": n / ref["seconds"], "engine_img_s": n / eng["seconds"],
                "speedup": ref["seconds"] / eng["seconds"], "cpu_speedup": ref["cpu_seconds"] / eng["cpu_seconds"],
                "rel_l1": rel_l1,
                "ref_peak_mb": ref["peak_mb"], "engine_peak_mb": eng["peak_mb"], "crop": eng.get("crop"),
                "locality": eng.get("locality"), "cone": eng.get("cone"), "channels_last": eng.get("channels_last"),
                "batch_size": eng.get("batch_size"), "bn_folded": eng.get("bn_folded"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"device={args.device} threads={args.threads} batch_size={args.batch_size} channels_last={args.channels_last}")
    print("| case | reference | ref img/s | engine img/s | speedup (wall) | speedup (CPU time) | rel L1 | peak MB ref / engine | crop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']}x{r['side']}, {r['images']} img, {r['layer']} | {r['reference']} | {r['ref_img_s']:.3f} | "
              f"{r['engine_img_s']:.3f} | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x | {r['rel_l1']:.1e} | "
              f"{r['ref_peak_mb']:.0f} / {r['engine_peak_mb']:.0f} | {r['crop']} |")
        assert r["rel_l1"] < 1e-4, f"maps differ: {r}"
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
