"""Retrain the study models shipped in ``erf_lab/study_models/`` (one command for all of them).

Each model is trained with the project's own recipe (:func:`erf_lab.train.train`, epoch based and
seeded, the same call as ``erf-lab train``), then shipped: its weights stored compactly (tensors of two
or more dimensions in float16), its test accuracy re-measured on the compact
weights (whole test split, and the fixed subset the test suite re-checks), and the training
command, seed, recipe and versions recorded in its ``study`` entry. A model already shipped
with the same recipe is skipped, and an interrupted training resumes from ``WORK/NAME.last.pt``.

    python scripts/train_study_models.py                    # everything, one after another
    python scripts/train_study_models.py --threads 1 &      # two processes, one thread each: they
    python scripts/train_study_models.py --threads 1 &      #   share the list (a lock per model)
    python scripts/train_study_models.py --only study_net-dk-s0 --device cuda
"""
import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from erf_lab import study_models
    from erf_lab.study_models import shipping

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "results" / "study_train"), help="training folder (resumable)")
    ap.add_argument("--dest", default=str(study_models.SHIPPED_DIR), help="where the shipped files go")
    ap.add_argument("--only", action="append", metavar="GLOB", help="names to train (repeatable; e.g. 'study_net-*-s0')")
    ap.add_argument("--shard", default="0/1", metavar="I/N", help="train every N-th recipe starting at I")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true", help="retrain models already shipped with this recipe")
    ap.add_argument("--list", action="store_true", help="print the recipes and exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    i, n = (int(v) for v in args.shard.split("/"))
    recipes = [r for r in study_models.RECIPES if not args.only or any(fnmatch.fnmatch(r.name, g) for g in args.only)]
    recipes = recipes[i::n]
    recipes.sort(key=lambda r: r.arch == "study_net")  # the long MobileNetV2 runs first: a shorter makespan
    if args.list:
        for r in recipes:
            print(f"{r.name:28s} {r.command()}")
        return 0
    dest, work = Path(args.dest), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for k, recipe in enumerate(recipes, 1):
        target = dest / f"{recipe.name}.pt"
        if not args.force and study_models.shipped_recipe(target) == recipe.to_dict():
            print(f"[{k}/{len(recipes)}] {recipe.name}: shipped, skipped", flush=True)
            continue
        lock = work / f"{recipe.name}.lock"
        try:  # another process of this script trains it (a lock left by a killed run: delete it)
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            print(f"[{k}/{len(recipes)}] {recipe.name}: locked by another process ({lock}), skipped", flush=True)
            continue
        try:
            t0 = time.perf_counter()
            print(f"[{k}/{len(recipes)}] {recipe.name}: {recipe.command()}", flush=True)
            best = shipping.train_recipe(recipe, work, device=args.device)
            info = shipping.ship(best, target, recipe)
        finally:
            lock.unlink()
        print(f"[{k}/{len(recipes)}] {recipe.name}: test acc {info['test_acc']:.4f} "
              f"(subset {info['subset_correct']}/{info['subset_size']}), {time.perf_counter() - t0:.0f}s -> {target}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
