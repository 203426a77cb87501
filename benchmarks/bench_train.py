"""Training benchmark: test accuracy on ``digits-ms`` reachable within a wall-clock budget.

For each op variant of the study net (and MobileNetV2 width 0.5) the script measures the
training throughput on a few batches, sizes the run to fit the budget (whole epochs over
the train split when they fit, else one epoch over a seeded subset), trains with
:func:`erf_lab.train.train`, and reports test accuracy and training wall time
(training plus per-epoch validation; the budget is the issue's target: 3 min for the study
net, 10 min for MobileNetV2). Results go to a JSON file and a Markdown table.

    python benchmarks/bench_train.py --out results/bench_train        # everything
    python benchmarks/bench_train.py --ops conv dk --skip-mobilenet    # a part
    python benchmarks/bench_train.py --ops                             # MobileNetV2 only

Timings depend on the machine and on what else runs on it; the JSON records the thread
count (the faster of 1 and 2 in the probe) and the load average at the start of each run.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dk_ops import models  # noqa: E402
from erf_lab.data import open_data  # noqa: E402
from erf_lab.train import train, write_json  # noqa: E402


def probe_ms_per_image(arch: str, op: str, arch_kwargs: dict, data: str, out: Path, batch: int, lr: float,
                       workers="auto", n: int = 2048) -> float:
    """Milliseconds per training image through the real pipeline (fresh digits-ms renders in
    the training process or in ``workers`` loader workers, augmentation, forward, backward,
    step), from the third epoch of a 3-epoch run on ``n`` images (the first reads cached
    renders, the second loads the render sources once; validation on 32, counted at 1/3).
    The per-epoch overhead (loader start, validation, two checkpoint writes) is spread over
    ``n`` images, so a small ``n`` overestimates the cost of a full epoch: 1,024 images left
    15-20% of the budget unused."""
    m = train(arch, op, data, 3, out / "probe.pt", arch_kwargs=arch_kwargs, max_train_images=n, max_eval_images=32,
              batch_size=batch, lr=lr, num_workers=workers, progress=False)
    return 1000 * m["history"][2]["seconds"] / (n + 32 / 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench_train")
    p.add_argument("--data", default="digits-ms")
    p.add_argument("--ops", nargs="*", default=list(models.OPS), help="study-net ops (none: MobileNetV2 only)")
    p.add_argument("--budget-s", type=float, default=180.0, help="study-net budget per op (seconds)")
    p.add_argument("--mobilenet-budget-s", type=float, default=600.0)
    p.add_argument("--mobilenet-ops", nargs="+", default=["conv"])
    p.add_argument("--skip-mobilenet", action="store_true")
    p.add_argument("--size-curriculum-epochs", default="auto",
                   help="train()'s size_curriculum_epochs (auto: a sixth of the epochs, at most 6, for "
                        "MobileNetV2; 0: off)")
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to probe; each run uses the fastest (on a busy machine 1 can win)")
    p.add_argument("--workers", nargs="+", default=["0"],
                   help="loader worker counts to probe with each thread count (1: digits-ms renders in a worker)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train = len(open_data(args.data, split="train"))
    n_val = len(open_data(args.data, split="val"))
    curriculum = args.size_curriculum_epochs if args.size_curriculum_epochs == "auto" else int(args.size_curriculum_epochs)
    runs = [("study_net", op, {}, args.budget_s) for op in args.ops]
    if not args.skip_mobilenet:
        runs += [("mobilenet_v2", op, {"width_mult": 0.5}, args.mobilenet_budget_s) for op in args.mobilenet_ops]
    results = []
    for arch, op, kw, budget in runs:
        probes = {}
        for t in args.threads:
            torch.set_num_threads(t)
            for wk in args.workers:
                wk = wk if wk == "auto" else int(wk)
                probes[(t, wk)] = probe_ms_per_image(arch, op, kw, args.data, out, args.batch_size, args.lr, wk)
        threads, workers = min(probes, key=probes.get)
        torch.set_num_threads(threads)
        ms = probes[(threads, workers)]
        # validation costs about a third of a training image per image; keep 10% slack for load changes
        per_epoch_s = (n_train * ms + n_val * ms / 3) / 1000
        epochs = int(min(args.max_epochs, 0.9 * budget // per_epoch_s))
        subset = None
        if epochs < 1:
            epochs, subset = 1, int(max(256, (0.9 * budget * 1000 - n_val * ms / 3) / ms))
        name = f"{arch}-{op}" + "".join(f"-{k}{v}" for k, v in kw.items())
        load = os.getloadavg()[0]
        print(f"{name}: {ms:.1f} ms/img with {threads} thread(s), workers={workers} -> {epochs} epoch(s) over "
              f"{subset or n_train} images", flush=True)
        m = train(arch, op, args.data, epochs, out / f"{name}.pt", seed=args.seed, arch_kwargs=kw,
                  max_train_images=subset, batch_size=args.batch_size, lr=args.lr, num_workers=workers,
                  size_curriculum_epochs=curriculum, progress=False)
        row = {"arch": arch, "op": op, "arch_kwargs": kw, "budget_s": budget, "probe_ms_per_image": ms,
               "epochs": epochs, "train_images": m["num_train"], "test_acc": m["test_acc"],
               "best_val_acc": m["best_val_acc"], "train_seconds": m["train_seconds"], "params": m["params"],
               "macs": m["macs"], "load_avg_1min_at_start": load, "threads": threads, "workers": workers,
               "probe_ms_per_image_by_threads_workers": {f"{t}x{w}": v for (t, w), v in probes.items()},
               "batch_size": args.batch_size, "lr": args.lr,
               "size_curriculum_epochs": torch.load(out / f"{name}.pt", weights_only=True)["train_args"][
                   "size_curriculum_epochs"]}
        results.append(row)
        print(json.dumps(row), flush=True)
        write_json({"results": results, "torch": torch.__version__, "cpu_count": os.cpu_count()},
                   out / "bench_train.json")
    lines = ["| model | op | epochs x train images | test acc | train time (s) | budget (s) | met |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        met = r["test_acc"] >= 0.9 and r["train_seconds"] <= r["budget_s"]
        lines.append(f"| {r['arch']}{' w' + str(r['arch_kwargs']['width_mult']) if r['arch_kwargs'] else ''} | "
                     f"{r['op']} | {r['epochs']} x {r['train_images']} | {100 * r['test_acc']:.1f}% | "
                     f"{r['train_seconds']:.0f} | {r['budget_s']:.0f} | {'yes' if met else 'no'} |")
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
