"""Training and shipping the study models (``scripts/train_study_models.py``): one recipe's
training run, the compact copy written into the package with its ``study`` entry, and the
subset accuracy the tests re-measure. Kept apart from the package's naming functions, which
:mod:`erf_lab.checkpoint` imports, because this module builds models through it."""
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

from ..checkpoint import build_arch
from ..io import atomic_write
from . import SUBSET_SIZE, Recipe, _load

__all__ = ["train_recipe", "ship", "subset_accuracy"]


def train_recipe(recipe: Recipe, work: Path, device: str = "cpu", progress: bool = True) -> Path:
    """Trains ``recipe`` into ``work/NAME.pt`` (resuming an interrupted run); returns that best checkpoint."""
    from ..train import train

    out = Path(work) / f"{recipe.name}.pt"
    train(recipe.arch, recipe.op, recipe.data, recipe.epochs, out, seed=recipe.seed, device=device,
          resume=True, arch_kwargs=dict(recipe.arch_kwargs), lr=recipe.lr,
          offset_lr_mult="auto" if recipe.offset_lr_mult is None else recipe.offset_lr_mult, progress=progress)
    return out


def _test_split(ckpt: Mapping[str, Any]):
    from ..train import training_splits

    c, h, w = ckpt["input_size"]
    _, sets = training_splits(ckpt["data_spec"], image_size=(h, w) if h == w else None, channels=c,
                              seed=int(ckpt["train_args"].get("seed", 0)))
    return sets["test"]


def _model(ckpt: Mapping[str, Any]) -> torch.nn.Module:
    model = build_arch(ckpt["arch"], ckpt["arch_kwargs"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    return model.eval()


def subset_accuracy(ckpt: Mapping[str, Any], size: int = SUBSET_SIZE) -> Tuple[int, int]:
    """(correct, images) of the checkpoint's model on the first ``size`` images of its test split."""
    from torch.utils.data import Subset

    from ..train import evaluate

    test = _test_split(ckpt)
    n = min(size, len(test))
    with torch.no_grad():
        r = evaluate(_model(ckpt), Subset(test, list(range(n))), progress=False)
    return int(round(r["acc"] * r["n"])), int(r["n"])


def _compact(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v
            for k, v in state.items()}


def ship(best: Path, target: Path, recipe: Recipe) -> Dict[str, Any]:
    """Writes the compact copy of the trained checkpoint ``best`` to ``target`` with its ``study`` entry."""
    from ..train import evaluate

    ckpt = _load(Path(best))
    ckpt["state_dict"] = _compact(ckpt["state_dict"])
    with torch.no_grad():
        test = evaluate(_model(ckpt), _test_split(ckpt), progress=False)
    correct, n = subset_accuracy(ckpt)
    ckpt["study"] = {
        "name": recipe.name, "recipe": recipe.to_dict(), "command": recipe.command(), "seed": recipe.seed,
        "test_acc": test["acc"], "test_images": test["n"], "test_acc_per_size_bin": test["acc_per_size_bin"],
        "test_acc_float32": ckpt["metrics"].get("test_acc"), "subset_correct": correct, "subset_size": n,
        "best_epoch": ckpt["metrics"].get("best_epoch"), "versions": ckpt.get("versions"),
        "storage": "weights (2+ dimensions) in float16, other tensors float32",
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: torch.save(ckpt, f))
    return ckpt["study"]
