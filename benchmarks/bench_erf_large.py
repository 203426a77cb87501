"""A single large image through ``erf-lab erf``: how much of the run is *not* the forward/backward.

Runs ``erf_lab.jobs.run_erf`` (what ``erf-lab erf`` calls: load the checkpoint, choose the default
layer, compute the map, its metrics, write erf.npz/json/png) on one noise image of ``--size``
pixels, and, in the same process and interleaved, the irreducible part: one plain forward to the
same layer and one backward from the same unit's target. The overhead is the share of the run
spent outside the engine's own batched passes (``meta["seconds"]["passes"]``: the forward and
backward, including the first batch's locality check); target: under 10% at 2048 px. The plain
pass is printed beside it as the natural alternative.

    python benchmarks/bench_erf_large.py [--size 2048] [--repeats 3] [--arch resnet50_dw] [--threads 2] [--no-crop]

Prints the median of each and writes ``--out`` (JSON) when given. Check ``uptime`` first: a figure
taken while another process is busy is not a figure.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_forward_backward(model, x, layer, unit):
    from erf_lab.layers import get_layer, run_to_layer

    x = x.detach().clone().requires_grad_(True)
    y = run_to_layer(model, x, get_layer(model, layer))
    torch.relu(y[0, :, unit[0], unit[1]]).sum().backward()
    return x.grad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--arch", default="resnet50_dw")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-crop", action="store_true", help="full-image passes (the engine crops a local unit's field)")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dk_ops import models
    from erf_lab.jobs import run_erf

    torch.manual_seed(0)
    model = models.create(args.arch, op="conv", num_classes=10).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_erf_large_"))
    ckpt = tmp / "model.pt"
    torch.save({"format": "erf-lab-checkpoint", "arch": args.arch, "arch_kwargs": {"op": "conv", "num_classes": 10},
                "state_dict": model.state_dict()}, ckpt)
    runs, plain, passes = [], [], []
    layer = unit = None
    for i in range(args.repeats):
        t0 = time.perf_counter()
        r = run_erf(str(ckpt), data="noise", num_images=1, image_size=args.size, out=str(tmp / f"erf{i}"),
                    progress=False, device="cpu", crop=not args.no_crop)
        runs.append(time.perf_counter() - t0)
        passes.append(r.meta["seconds"]["passes"])
        layer, unit = r.meta["layer"], tuple(r.meta["unit"])
        x = torch.randn(1, 3, args.size, args.size)
        for p in model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        plain_forward_backward(model, x, layer, unit)
        plain.append(time.perf_counter() - t0)
    total, fb = statistics.median(runs), statistics.median(plain)
    share = statistics.median([(t - p) / t for t, p in zip(runs, passes)])
    result = {"arch": args.arch, "size": args.size, "layer": layer, "threads": args.threads, "repeats": args.repeats,
              "crop": not args.no_crop,
              "run_erf_s": total, "engine_passes_s": statistics.median(passes), "plain_forward_backward_s": fb,
              "outside_share": share, "runs_s": runs, "passes_s": passes, "plain_s": plain, "torch": torch.__version__}
    print(f"{args.arch} at {args.size}px, default layer {layer}, {'full image' if args.no_crop else 'crop'}: run_erf {total:.2f} s (median of {args.repeats}), "
          f"engine passes {result['engine_passes_s']:.2f} s, outside them {100 * share:.1f}%; "
          f"a plain forward+backward {fb:.2f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
