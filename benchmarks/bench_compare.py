"""erf_lab.compare over several layers against one compute_erf call per layer, in the same run.

The case of the issue: ResNet-50-DW (seeded weights, BatchNorm statistics randomised so folding is
exercised), its four stages layer1..layer4, 224x224 images of the embedded digits-ms data (32, drawn
with seed 0), the replknet preset, the centre unit. The baseline is what a user writes without
``compare``: ``[compute_erf(model, "digits-ms", layer=L, image_size=224, num_images=32) for L in
layers]``; ``compare`` does the same work as one job (data opened and loaded once, the model traced,
BatchNorm-folded and prepared once, each early layer on its own verified crop, the full-image
layers on one shared forward). Both sides run in this process after a warm-up of each (imports,
oneDNN primitives), alternating, ``--reps`` times; medians of wall and process CPU time are
reported. The maps must agree to relative L1 < 1e-6.

    python benchmarks/bench_compare.py                  # the README row (CPU)
    python benchmarks/bench_compare.py --quick          # a smoke run (160 px, 4 images)
    python benchmarks/bench_compare.py --device cuda
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _model(device):
    import torch
    from dk_ops import models

    torch.manual_seed(0)
    m = models.create("resnet50_dw", op="conv", num_classes=10).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.to(device)


def _timed(fn, device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, _cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="160 px, 4 images, one repetition: a smoke run")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.side, args.images, args.reps = 160, 4, 1
    import numpy as np
    import torch

    import erf_lab
    from erf_lab import compute_erf

    torch.set_num_threads(args.threads)
    model = _model(args.device)
    common = dict(image_size=args.side, num_images=args.images, device=args.device, progress=False)

    def separate():
        return [compute_erf(model, "digits-ms", layer=layer, **common) for layer in LAYERS]

    def together():
        return erf_lab.compare([model], layers=list(LAYERS), data="digits-ms", **common)

    # warm-up: imports, the data cache, oneDNN / cuDNN primitives of every shape
    compute_erf(model, "digits-ms", layer="layer4", **dict(common, num_images=2))
    erf_lab.compare([model], layers=list(LAYERS), data="digits-ms", **dict(common, num_images=2))
    sep_t, sep_c, tog_t, tog_c = [], [], [], []
    for _ in range(args.reps):
        sep, t, c = _timed(separate, args.device)
        sep_t.append(t)
        sep_c.append(c)
        tog, t, c = _timed(together, args.device)
        tog_t.append(t)
        tog_c.append(c)
    rel = [float(np.abs(tog.cells[(0, j)].map - s.map).sum() / np.abs(s.map).sum()) for j, s in enumerate(sep)]
    cells = [tog.cells[(0, j)].meta for j in range(len(LAYERS))]
    row = {
        "device": args.device, "threads": args.threads, "side": args.side, "images": args.images, "reps": args.reps,
        "layers": list(LAYERS), "separate_s": statistics.median(sep_t), "compare_s": statistics.median(tog_t),
        "speedup": statistics.median(sep_t) / statistics.median(tog_t),
        "cpu_speedup": statistics.median(sep_c) / statistics.median(tog_c),
        "separate_runs_s": sep_t, "compare_runs_s": tog_t, "max_rel_l1": max(rel),
        "crops": [c["crop"] for c in cells], "shared_forward": cells[-1]["shared_forward"],
        "per_layer_separate_s": [s.meta["seconds"] for s in sep],
    }
    print(json.dumps(row, indent=1))
    print()
    print("| case | 4 x compute_erf | compare | speedup (wall) | speedup (CPU time) | max rel L1 |")
    print("|---|---|---|---|---|---|")
    print(f"| ResNet-50-DW {', '.join(LAYERS)}, {args.side}x{args.side}, {args.images} img, {args.device} "
          f"({args.threads} threads) | {row['separate_s']:.2f} s | {row['compare_s']:.2f} s | {row['speedup']:.2f}x | "
          f"{row['cpu_speedup']:.2f}x | {row['max_rel_l1']:.1e} |")
    assert row["max_rel_l1"] < 1e-6, f"maps differ: {rel}"
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
