"""Training benchmark: test accuracy on ``digits-ms`` reachable within a wall-clock budget.

For each op variant of the study net (and MobileNetV2 width 0.5) the script trains with
:func:`erf_lab.train.train` under ``time_budget_s`` (the issue's targets: 3 min for the study
net, 10 min for MobileNetV2): the cosine schedule runs over the budget and training stops
when it is spent, so a slow machine trains fewer epochs rather than overrunning. It reports
test accuracy, the epochs done and the wall time (training, per-epoch validation and
checkpoint writes). Results go to a JSON file and a Markdown table.

    python benchmarks/bench_train.py --out results/bench_train        # everything
    python benchmarks/bench_train.py --ops conv dk --skip-mobilenet    # a part
    python benchmarks/bench_train.py --ops                             # MobileNetV2 only

Accuracy within a time budget depends on the machine and on what else runs on it. Each run
records a speed index measured just before it: milliseconds per image of a fixed workload
(training steps of the conv study net on random 64x64 batches of 64, channels-last, the
best of five rounds), so runs on different days can be compared.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dk_ops import models  # noqa: E402
from erf_lab.io import write_json  # noqa: E402
from erf_lab.train import train  # noqa: E402


def speed_index(rounds: int = 5, steps: int = 10, batch: int = 64) -> float:
    """Milliseconds per image of conv study-net training steps on random data (lower is faster)."""
    torch.manual_seed(0)
    model = models.create("study_net", op="conv", num_classes=10, widths=(16, 32, 64), depth=2, expand=2,
                          stem_stride=2).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps)
    return 1000 * best / batch


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
    p.add_argument("--max-epochs", type=int, default=100, help="epoch cap of each run (the budget ends it first)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--study-kwargs", type=json.loads, default={}, help="JSON: extra study-net arguments")
    p.add_argument("--train-kwargs", type=json.loads, default={}, help="JSON: extra train() arguments")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    curriculum = args.size_curriculum_epochs if args.size_curriculum_epochs == "auto" else int(args.size_curriculum_epochs)
    runs = [("study_net", op, dict(args.study_kwargs), args.budget_s) for op in args.ops]
    if not args.skip_mobilenet:
        runs += [("mobilenet_v2", op, {"width_mult": 0.5}, args.mobilenet_budget_s) for op in args.mobilenet_ops]
    results = []
    for arch, op, kw, budget in runs:
        name = f"{arch}-{op}" + "".join(f"-{k}{v}" for k, v in kw.items())
        load = os.getloadavg()[0]
        speed = speed_index()
        print(f"{name}: budget {budget:.0f} s, {args.threads} thread(s), speed index {speed:.3f} ms/img, "
              f"load {load:.2f}", flush=True)
        m = train(arch, op, args.data, args.max_epochs, out / f"{name}.pt", seed=args.seed, arch_kwargs=kw,
                  time_budget_s=budget, batch_size=args.batch_size, lr=args.lr,
                  size_curriculum_epochs=curriculum, progress=False, **args.train_kwargs)
        train_args = torch.load(out / f"{name}.pt", weights_only=True)["train_args"]
        images = sum(h.get("train_images", m["num_train"]) for h in m["history"])
        row = {"arch": arch, "op": op, "arch_kwargs": kw, "budget_s": budget, "epochs": len(m["history"]),
               "train_images_seen": images, "ms_per_train_image": 1000 * m["train_seconds"] / max(images, 1),
               "test_acc": m["test_acc"], "best_val_acc": m["best_val_acc"], "best_epoch": m["best_epoch"],
               "train_seconds": m["train_seconds"], "test_acc_per_size_bin": m["test_acc_per_size_bin"],
               "params": m["params"], "macs": m["macs"], "speed_index_ms_per_image": speed,
               "load_avg_1min_at_start": load, "threads": args.threads, "batch_size": args.batch_size,
               "lr": args.lr, "size_curriculum_epochs": train_args["size_curriculum_epochs"],
               "train_kwargs": args.train_kwargs}
        results.append(row)
        print(json.dumps(row), flush=True)
        write_json(out / "bench_train.json",
                   {"results": results, "torch": torch.__version__, "cpu_count": os.cpu_count()})
    lines = ["| model | op | speed index (ms/img) | ms / train image | epochs | test acc | "
             "smallest / largest size bin | train time (s) | budget (s) | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        met = r["test_acc"] >= 0.9 and r["train_seconds"] <= r["budget_s"]
        bins = list(r["test_acc_per_size_bin"].values())
        span = f"{100 * bins[0]:.0f}% / {100 * bins[-1]:.0f}%" if bins else "-"
        model = r["arch"] + "".join(f" {k}={v}" for k, v in r["arch_kwargs"].items())
        lines.append(f"| {model} | {r['op']} | {r['speed_index_ms_per_image']:.2f} | {r['ms_per_train_image']:.2f} | "
                     f"{r['epochs']} | {100 * r['test_acc']:.1f}% | {span} | {r['train_seconds']:.0f} | "
                     f"{r['budget_s']:.0f} | {'yes' if met else 'no'} |")
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
