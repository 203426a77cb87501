"""Training of study models on any ``--data`` source (``erf-lab train``).

:func:`train` builds ``dk_ops.models.create(arch, op=op, num_classes=K, **arch_kwargs)``,
trains it with AdamW (or SGD with Nesterov momentum) on a cosine schedule with a linear
warm-up, light augmentation (random shifts of up to 1/16 of the image side; no flips, which
would change digits; ``digits-ms`` also renders fresh training images every epoch),
validates every epoch, and keeps two checkpoints:

* ``OUT`` -- the best epoch by validation accuracy, the file to analyse
  (``erf-lab erf --model OUT``); its ``metrics`` include the test accuracy;
* ``OUT.last.pt`` -- the latest epoch with optimizer, scheduler and RNG states,
  read by ``resume=True``;

and ``OUT.metrics.json`` beside them. Every write goes to a temporary file in the same
folder and is renamed into place, so an interrupt leaves the previous files intact.

Offset generators learn at a fraction of the learning rate (``offset_lr_mult``), the
convention of DCN implementations (mmcv/mmdetection's ``lr_mult=0.1`` on ``conv_offset``):
with Adam at the full rate, one step moves a zero-initialised generator's offsets by about
``lr x fan-in`` pixels, so within ten steps DK kernels sample far outside their 4x4 scope
(an all-zero kernel with zero gradient) and training stalls at chance. By default
(:data:`OFFSET_LR_MULT`) DK's kernel-offset generators learn at 0.1x and DCN's
sampling-offset generators at 0.03x: in 3-minute study-net runs DCN stayed at chance at
0.3x, reached 90.0% and 90.6% at 0.1x and 92.5% at 0.03x.

Randomness is seeded per epoch (shuffling, augmentation and the global torch generator are
reseeded from ``(seed, epoch)``), so ``resume`` after epoch ``k`` gives the same weights as
an uninterrupted run with the same seed.

Data sources without their own splits (a plain image folder, a COCO file) are divided here:
a seeded 80/10/10 train/val/test split of the items.

Checkpoint dict (plain types and tensors only; ``torch.load(..., weights_only=True)`` reads it)::

    {"format": "erf-lab-checkpoint", "version": 1, "arch": str, "arch_kwargs": dict,
     "state_dict": ..., "data_spec": str, "class_names": [...], "size_bin_edges": [...] | None,
     "normalization": {"mean": [...], "std": [...]}, "input_size": [C, H, W],
     "metrics": {...}, "epoch": int, "versions": {...}, "train_args": {...},
     "optimizer": ..., "scheduler": ..., "rng": {...}}
"""
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import ErfLabError
from .io import atomic_write, check_output_file, dumps, versions, write_json
from ._layout import resolve_channels_last, to_channels_last
from .progress import loader_bar, write_line

CHECKPOINT_FORMAT = "erf-lab-checkpoint"
CHECKPOINT_VERSION = 1
HOLDOUT_FRACTIONS = (0.8, 0.1)  # train/val of a source without splits; test is the rest
CURRICULUM_START = 0.45  # the size curriculum's first object-size floor (fraction of the side)
# progressive resizing: (until this fraction of the run, train at this fraction of the image side)
PROGRESSIVE_RESIZE = ((0.3, 0.5), (0.6, 0.75))
# learning-rate factors of offset generators: DK's kernel offsets, DCN's sampling offsets
OFFSET_LR_MULT = {"kernel": 0.1, "sampling": 0.03}

PathLike = Union[str, "os.PathLike[str]"]


# ---- files ----------------------------------------------------------------------------------
def companion_paths(out_path: PathLike) -> Dict[str, Path]:
    """``{"best": OUT, "last": OUT.last.pt, "metrics": OUT.metrics.json}`` (suffix ``.pt`` dropped)."""
    out = Path(out_path)
    stem = out.with_suffix("") if out.suffix in (".pt", ".pth") else out
    return {"best": out, "last": Path(f"{stem}.last.pt"), "metrics": Path(f"{stem}.metrics.json")}


def save_checkpoint(checkpoint: Dict[str, Any], path: PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (atomic)."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), fsync=True)


# ---- data -----------------------------------------------------------------------------------
def training_splits(data_spec: str, image_size=None, channels: int = 3, seed: int = 0,
                    max_train: Optional[int] = None, max_eval: Optional[int] = None, skip_bad: bool = False):
    """``(train data set, {"train", "val", "test": Subset})`` exactly as :func:`train` uses them:
    the source's own splits, or a seeded 80/10/10 split of a source without splits; then
    seeded subsets of ``max_train`` / ``max_eval`` items."""
    from .data import open_data

    kw = dict(image_size=image_size, channels=channels, skip_bad=skip_bad, seed=seed)
    train = open_data(data_spec, split="train", **kw)
    if train.num_classes < 2 or (train.labels < 0).any():
        raise ErfLabError(f"data {data_spec!r} is unlabelled (or has one class); training needs labels: "
                          "class sub-folders, a COCO file, or digits-ms")
    if getattr(train, "has_splits", True):
        val = open_data(data_spec, split="val", **kw)
        test = open_data(data_spec, split="test", **kw)
        sets = {"train": train, "val": val, "test": test}
        base = {k: np.arange(len(v)) for k, v in sets.items()}
    else:
        perm = np.random.default_rng([seed, 7]).permutation(len(train))
        a = int(round(HOLDOUT_FRACTIONS[0] * len(perm)))
        b = a + int(round(HOLDOUT_FRACTIONS[1] * len(perm)))
        if b >= len(perm) or a == 0:
            raise ErfLabError(f"data {data_spec!r}: {len(perm)} items are too few to hold out val and test sets")
        sets = {"train": train, "val": train, "test": train}
        base = {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}
    limits = {"train": max_train, "val": max_eval, "test": max_eval}
    out = {}
    for k, idx in base.items():
        if limits[k] is not None and limits[k] < len(idx):
            rng = np.random.default_rng([seed, 8, ("train", "val", "test").index(k)])
            idx = np.sort(rng.choice(idx, limits[k], replace=False))
        out[k] = Subset(sets[k], idx.tolist())
    return train, out


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` pixels (edge pixels repeated)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


# ---- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 256, device: Union[str, torch.device] = "cpu",
             num_workers: int = 0, desc: str = "eval", progress: bool = True, summary: bool = True) -> Dict[str, Any]:
    """Loss, accuracy and accuracy per size bin of ``model`` on ``data`` (items as ``open_data``'s).

    ``progress``: a bar on a terminal, else one line when done (none with ``summary=False``;
    see :func:`erf_lab.progress.progress`)."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    total, correct, loss_sum = 0, 0, 0.0
    bin_hits: Dict[int, List[int]] = {}
    for batch in loader_bar(loader, desc=desc, leave=False, enabled=progress, summary=summary):
        x, y = batch["image"].to(device), batch["label"].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        hit = (logits.argmax(1) == y).cpu()
        correct += int(hit.sum())
        total += len(y)
        for b, h in zip(batch["size_bin"].tolist(), hit.tolist()):
            bin_hits.setdefault(b, [0, 0])
            bin_hits[b][0] += int(h)
            bin_hits[b][1] += 1
    per_bin = {str(b): c / n for b, (c, n) in sorted(bin_hits.items()) if b >= 0}
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1), "n": total, "acc_per_size_bin": per_bin}


# ---- training -------------------------------------------------------------------------------
def _lr_lambda(warmup_steps: int, total_steps: int, time_fraction=None):
    """Linear warm-up, then a cosine over the steps, or over the fraction of the time budget
    spent (``time_fraction()``) when that is further along."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if time_fraction is not None:
            t = max(t, time_fraction())
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def auto_curriculum_epochs(epochs: int) -> int:
    """``size_curriculum_epochs="auto"``: a sixth of the run (rounded), at most 6 epochs."""
    return min(6, int(round(epochs / 6)))


def size_floor(epoch: int, curriculum_epochs: int) -> float:
    """The object-size floor (fraction of the side) of fresh renders at 0-based ``epoch``
    under a size curriculum of ``curriculum_epochs`` (see :func:`train`)."""
    from .data.digits_ms import SIZE_RANGE

    if epoch < 1 or epoch > curriculum_epochs:
        return SIZE_RANGE[0]
    t = (epoch - 1) / curriculum_epochs
    return math.exp((1 - t) * math.log(CURRICULUM_START) + t * math.log(SIZE_RANGE[0]))


def resize_schedule(spec: Union[str, None, Sequence[Sequence[float]]], model: Optional[nn.Module] = None):
    """``progressive_resize`` as a tuple of ``(until, scale)`` steps (empty: off).

    ``"auto"``: :data:`PROGRESSIVE_RESIZE` for models that set ``prefers_progressive_resize``
    (the study nets), else off. A string ``"0.3:0.5,0.6:0.75"`` reads as two steps."""
    if spec is None or spec in ("off", "none", ""):
        return ()
    if spec == "auto":
        return PROGRESSIVE_RESIZE if getattr(model, "prefers_progressive_resize", False) else ()
    try:
        if isinstance(spec, str):
            spec = [part.split(":") for part in spec.split(",")]
        steps = tuple((float(until), float(scale)) for until, scale in spec)
    except (TypeError, ValueError):
        raise ErfLabError(f"progressive resize must be auto, off or UNTIL:SCALE[,UNTIL:SCALE...], got {spec!r}") from None
    untils = [u for u, _ in steps]
    if not steps or untils != sorted(set(untils)) or not all(0 < u <= 1 and 0 < sc <= 1 for u, sc in steps):
        raise ErfLabError("progressive resize steps need increasing fractions of the run in (0, 1] and "
                          f"image scales in (0, 1], got {spec!r}")
    return steps


def train_resolution(progress: float, schedule, size: Sequence[int]) -> Tuple[int, int]:
    """The training image size at ``progress`` (fraction of the run done) under ``schedule``
    (:func:`resize_schedule`): the first step whose fraction is not yet reached scales the
    side, rounded to a multiple of 8 px (at least 8); past the last step, the full size."""
    scale = next((sc for until, sc in schedule if progress < until), 1.0)
    if scale == 1.0:
        return int(size[0]), int(size[1])
    return tuple(max(8, int(round(side * scale / 8)) * 8) for side in size)  # type: ignore[return-value]


def _offset_kind(name: str) -> Optional[str]:
    """``"kernel"`` (a DK kernel-offset generator's parameter), ``"sampling"`` (DCN's), or None."""
    if "kernel_offset_generator" in name:
        return "kernel"
    return "sampling" if "offset_generator" in name else None


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ErfLabError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _load_resume(paths: Dict[str, Path]) -> Optional[Dict[str, Any]]:
    for key in ("last", "best"):
        if paths[key].is_file():
            try:
                ckpt = torch.load(paths[key], map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure is a bad file
                raise ErfLabError(f"{paths[key]}: cannot read the checkpoint to resume ({type(exc).__name__}); "
                                  "delete it or train without --resume") from None
            if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
                raise ErfLabError(f"{paths[key]}: not an erf-lab training checkpoint with optimizer state; "
                                  "cannot resume from it")
            return ckpt
    return None


def train(
    arch: str,
    op: str = "conv",
    data_spec: str = "digits-ms",
    epochs: int = 10,
    out_path: PathLike = "checkpoint.pt",
    *,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    resume: bool = False,
    lr: Optional[float] = None,
    batch_size: int = 64,
    num_workers: Union[int, str] = "auto",
    optimizer: str = "adamw",
    weight_decay: Optional[float] = None,
    warmup_epochs: float = 0.5,
    offset_lr_mult: Union[float, str] = "auto",
    label_smoothing: float = 0.0,
    augment: bool = True,
    size_curriculum_epochs: Union[int, str] = "auto",
    time_budget_s: Optional[float] = None,
    progressive_resize: Union[str, None, Sequence[Sequence[float]]] = "auto",
    channels_last: Union[bool, str] = "auto",
    image_size: Union[int, Sequence[int], None] = None,
    channels: int = 3,
    arch_kwargs: Optional[Dict[str, Any]] = None,
    max_train_images: Optional[int] = None,
    max_eval_images: Optional[int] = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train ``arch`` with operator ``op`` on ``data_spec``; write checkpoints; return the metrics.

    Args:
        arch: a ``dk_ops.models`` name (``study_net``, ``mobilenet_v2``, ``resnet50_dw``).
        op: ``conv``, ``dcn``, ``condconv``, ``dk_global``, ``dk`` or ``dk_dcn``.
        data_spec: any ``--data`` spec with labels (see :func:`erf_lab.data.open_data`).
        epochs: total epochs (with ``resume``, the run continues up to this many); with
            ``time_budget_s``, the most epochs.
        out_path: the best checkpoint; ``.last.pt`` and ``.metrics.json`` go beside it.
        seed: seeds the model initialisation, shuffling and augmentation.
        device: ``cpu``, ``cuda[:i]`` or ``auto``.
        resume: continue from ``OUT.last.pt`` (or ``OUT``) when it exists.
        lr: peak learning rate (default 6e-3 for AdamW, 0.1 for SGD).
        batch_size, num_workers: of the training loader; ``num_workers="auto"``: none. A
            fresh ``digits-ms`` batch renders in about 0.14 ms per image in the training
            process; on 2 cores a worker process only competes with the training threads
            (conv study net: 1.0 ms/img with 2 threads and no worker, 1.45 with 1 thread and
            one worker). Results do not depend on the number of workers.
        optimizer: ``adamw`` or ``sgd``.
        weight_decay: default 0.05 (AdamW) or 5e-4 (SGD).
        warmup_epochs: linear warm-up length, in epochs.
        offset_lr_mult: learning-rate factor of the offset generators (the
            ``*kernel_offset_generator*`` parameters of DK layers and the
            ``*offset_generator*`` ones of DCN layers); ``"auto"``: :data:`OFFSET_LR_MULT`.
        label_smoothing: of the cross-entropy loss.
        augment: random shifts of up to 1/16 of the image side.
        time_budget_s: train for this many seconds of wall time (training, per-epoch
            validation and checkpoint writes; ``metrics["train_seconds"]``) instead of a fixed
            number of epochs: the cosine schedule runs over the fraction of the budget spent
            (or of ``epochs``, whichever is further along), and training stops, mid-epoch if
            need be, early enough to validate and write the last epoch within the budget (the
            last validation's duration is kept in reserve). Results then depend on the
            machine's speed; runs with the same seed are not repeatable.
        size_curriculum_epochs: for epochs ``1..E`` the fresh ``digits-ms`` renders' object
            sizes start at :data:`CURRICULUM_START` x side (large objects only) and the floor
            falls log-linearly to the full range's 0.12 x side at epoch ``E + 1`` (epoch 0
            reads the cached, full-range renders; val and test are never changed). ``"auto"``:
            a sixth of the run (with ``time_budget_s``: of the epochs the first epoch's duration
            predicts), at most 6 epochs, for models that set
            ``prefers_size_curriculum`` (MobileNetV2) on data that renders on the fly (fresh
            ``digits-ms``), else 0. Without it MobileNetV2 sat at chance for 6-33 epochs (small
            objects on textured backgrounds); the study nets leave chance within two epochs and
            did 1-2 points worse with it in 3-minute runs.
        progressive_resize: train on downscaled images early in the run (antialiased
            bilinear resizing of each batch; validation and test at full size): ``(until,
            scale)`` steps, e.g. ``((0.3, 0.5), (0.6, 0.75))`` trains at half the side until
            30% of the run (fraction of the epochs, or of ``time_budget_s`` when further along),
            at 3/4 until 60%, then at full size. ``"auto"``: :data:`PROGRESSIVE_RESIZE` for
            models that set ``prefers_progressive_resize`` (the study nets), else off. Study
            nets in 3-minute runs: 6 epochs more (37 vs 31, conv) and 92.0% vs 90.6% test
            accuracy; the small-object bins gain most (docs/experiments.md).
        channels_last: train in channels-last memory format (model and batches). ``"auto"``:
            on CPU for models with 2-D convolutions (:func:`erf_lab._layout.channels_last_pays`:
            oneDNN's convolutions and BatchNorm are faster there; CondConv's 5-D expert bank
            stays as it is and its grouped convolution runs in the default format). Results
            differ only by float rounding; checkpoints are saved in the default format.
        image_size, channels: passed to ``open_data``.
        arch_kwargs: extra model arguments (e.g. ``{"width_mult": 0.5}``).
        max_train_images, max_eval_images: seeded subsets, for quick runs.
        skip_bad: skip undecodable images.
        progress: one line per epoch (stdout); tqdm bars on a terminal, and when stderr is
            not one, a line for the final test instead (:func:`erf_lab.progress.progress`).

    Returns:
        the metrics dict (also in the checkpoint and ``OUT.metrics.json``): per-epoch
        ``history``, ``best_epoch``, ``best_val_acc``, ``test_acc``, ``test_acc_per_size_bin``,
        ``train_seconds`` (wall time of training, validation and checkpoint writes, excluding
        the final test),
        ``params`` and ``macs``.
    """
    from dk_ops import models

    if op not in models.OPS:
        raise ErfLabError(f"unknown op {op!r}; choose one of {', '.join(models.OPS)}")
    if arch not in models.names():
        raise ErfLabError(f"unknown arch {arch!r}; choose one of {', '.join(models.names())}")
    if epochs < 1:
        raise ErfLabError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ErfLabError(f"batch size must be >= 1, got {batch_size}")
    if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0):
        raise ErfLabError(f"num_workers must be an integer >= 0 or 'auto', got {num_workers!r}")
    if size_curriculum_epochs != "auto" and (isinstance(size_curriculum_epochs, bool)
                                             or not isinstance(size_curriculum_epochs, int) or size_curriculum_epochs < 0):
        raise ErfLabError(f"size_curriculum_epochs must be an integer >= 0 or 'auto', got {size_curriculum_epochs!r}")
    if time_budget_s is not None and not (isinstance(time_budget_s, (int, float)) and time_budget_s > 0):
        raise ErfLabError(f"time budget must be a positive number of seconds, got {time_budget_s!r}")
    if offset_lr_mult != "auto" and (isinstance(offset_lr_mult, (str, bool)) or not offset_lr_mult >= 0):
        raise ErfLabError(f"offset_lr_mult must be a number >= 0 or 'auto', got {offset_lr_mult!r}")
    optimizer = optimizer.lower()
    if optimizer not in ("adamw", "sgd"):
        raise ErfLabError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    dev = _resolve_device(device)
    paths = companion_paths(out_path)
    for p in paths.values():  # before any work: an unwritable --out fails now, not after training
        check_output_file(p)
    state = _load_resume(paths) if resume else None
    if state is not None and (state["arch"], state["arch_kwargs"].get("op"), state["data_spec"]) != (arch, op, data_spec):
        raise ErfLabError(f"{paths['last']}: was trained as {state['arch']}/{state['arch_kwargs'].get('op')} on "
                          f"{state['data_spec']!r}, not {arch}/{op} on {data_spec!r}; use another --out")

    base, sets = training_splits(data_spec, image_size, channels, seed, max_train_images, max_eval_images, skip_bad)
    if num_workers == "auto":
        num_workers = 0
    h, w = base.image_size
    torch.manual_seed(seed)
    kwargs = dict(arch_kwargs or {})
    if channels != 3:
        kwargs.setdefault("in_chans", channels)
    model = models.create(arch, op=op, num_classes=base.num_classes, **kwargs)
    full_kwargs = dict(getattr(model, "arch_kwargs", dict(op=op, num_classes=base.num_classes, **kwargs)))
    can_curriculum = hasattr(base, "set_size_floor") and getattr(base, "renders_on_the_fly", False)
    curriculum_pending = False  # "auto" under a time budget: sized once the first epoch is timed
    if size_curriculum_epochs == "auto":
        wants = can_curriculum and getattr(model, "prefers_size_curriculum", False)
        curriculum_pending = wants and time_budget_s is not None
        size_curriculum_epochs = auto_curriculum_epochs(epochs) if wants and not curriculum_pending else 0
    if size_curriculum_epochs and not can_curriculum:
        raise ErfLabError(f"a size curriculum needs fresh digits-ms renders (digits-ms with fresh=1), not {data_spec!r}")
    resize_steps = resize_schedule(progressive_resize, model)
    cx = models.complexity(model, input_size=(channels, h, w))
    model.to(dev)
    channels_last = resolve_channels_last(channels_last, model, dev)
    if channels_last:
        to_channels_last(model)

    peak_lr = lr if lr is not None else (6e-3 if optimizer == "adamw" else 0.1)
    wd = weight_decay if weight_decay is not None else (0.05 if optimizer == "adamw" else 5e-4)
    mults = dict(OFFSET_LR_MULT) if offset_lr_mult == "auto" else dict.fromkeys(OFFSET_LR_MULT, float(offset_lr_mult))
    groups = []
    for kind in (None, "kernel", "sampling"):
        for decays in (True, False):
            params = [p for n, p in model.named_parameters() if _offset_kind(n) == kind and (p.ndim > 1) == decays]
            if params:
                groups.append({"params": params, "weight_decay": wd if decays else 0.0,
                               "lr": peak_lr * (1.0 if kind is None else mults[kind])})
    opt = (torch.optim.AdamW(groups, lr=peak_lr, fused=True) if optimizer == "adamw"
           else torch.optim.SGD(groups, lr=peak_lr, momentum=0.9, nesterov=True))
    steps_per_epoch = math.ceil(len(sets["train"]) / batch_size)
    clock = {"start": time.perf_counter()}  # spent() = metrics["train_seconds"] + time since the (re)start

    def spent() -> float:
        return time.perf_counter() - clock["start"]

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(int(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch,
                        None if time_budget_s is None else lambda: spent() / time_budget_s))

    train_args = dict(optimizer=optimizer, lr=peak_lr, weight_decay=wd, batch_size=batch_size, epochs=epochs,
                      warmup_epochs=warmup_epochs, offset_lr_mult=mults, label_smoothing=label_smoothing,
                      augment=augment, size_curriculum_epochs=size_curriculum_epochs, time_budget_s=time_budget_s,
                      progressive_resize=[list(step) for step in resize_steps],
                      channels_last=bool(channels_last), seed=seed,
                      max_train_images=max_train_images, max_eval_images=max_eval_images, device=str(dev))
    metrics: Dict[str, Any] = {"history": [], "best_epoch": 0, "best_val_acc": -1.0, "train_seconds": 0.0,
                               "params": int(cx["params"]), "macs": int(cx["macs"]),
                               "num_train": len(sets["train"]), "num_val": len(sets["val"]), "num_test": len(sets["test"])}
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        metrics = state["metrics"]
        start_epoch = int(state["epoch"])
        if curriculum_pending and start_epoch >= 1:
            size_curriculum_epochs = int(state["train_args"].get("size_curriculum_epochs") or 0)
            curriculum_pending = False
            train_args["size_curriculum_epochs"] = size_curriculum_epochs
    clock["start"] = time.perf_counter() - metrics["train_seconds"]
    reserve = 0.0  # the last epoch's validation and checkpoint time, kept back under a time budget
    step_s = 0.0  # the last training step's time, likewise

    def checkpoint(epoch: int, with_state: bool) -> Dict[str, Any]:
        ckpt: Dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": arch, "arch_kwargs": full_kwargs,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "data_spec": data_spec, "class_names": list(base.class_names),
            "size_bin_edges": None if base.size_bin_edges is None else list(base.size_bin_edges),
            "normalization": {"mean": list(base.mean), "std": list(base.std)},
            "input_size": [channels, h, w], "metrics": json.loads(dumps(metrics)), "epoch": epoch,
            "versions": versions(), "train_args": dict(train_args),
        }
        if with_state:
            ckpt["optimizer"] = opt.state_dict()
            ckpt["scheduler"] = sched.state_dict()
            ckpt["rng"] = {"torch": torch.get_rng_state(), "seed": seed, "epoch": epoch}
        return ckpt

    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    max_shift = max(1, min(h, w) // 16) if augment else 0
    for epoch in range(start_epoch, epochs):
        if time_budget_s is not None and metrics["history"] and spent() + 1.25 * reserve >= time_budget_s:
            metrics["stopped_by_time_budget"] = True
            break
        t0 = time.perf_counter()
        if curriculum_pending and epoch >= 1:
            estimated = min(epochs, int(time_budget_s / max(metrics["history"][0]["seconds"], 1e-9)))
            size_curriculum_epochs = train_args["size_curriculum_epochs"] = auto_curriculum_epochs(estimated)
            curriculum_pending = False
        torch.manual_seed(seed * 100_003 + epoch)  # dropout-like randomness inside the model
        # separate streams: a loader with workers draws its order ahead of the steps' shifts
        gen = torch.Generator().manual_seed(seed * 100_019 + epoch)
        order = torch.Generator().manual_seed(seed * 100_043 + epoch)
        if hasattr(base, "set_epoch"):
            base.set_epoch(epoch)  # fresh digits-ms renders; a no-op for other sources
        if size_curriculum_epochs:
            base.set_size_floor(size_floor(epoch, size_curriculum_epochs))
        loader = DataLoader(sets["train"], batch_size=batch_size, shuffle=True, generator=order,
                            num_workers=num_workers, drop_last=len(sets["train"]) > batch_size)
        model.train()
        done = max(epoch / epochs, 0.0 if time_budget_s is None else spent() / time_budget_s)
        res = train_resolution(done, resize_steps, (h, w))
        loss_sum, correct, seen, stopped = 0.0, 0, 0, False
        bar = loader_bar(loader, desc=f"epoch {epoch + 1}/{epochs} train", leave=False, enabled=progress,
                         summary=False)  # the epoch line below says it
        for batch in bar:
            if time_budget_s is not None and seen and spent() + 1.25 * reserve + 2 * step_s >= time_budget_s:
                stopped = True
                break
            t_step = time.perf_counter()
            x = _shift(batch["image"], max_shift, gen).to(dev)
            if res != (h, w):
                x = F.interpolate(x, size=res, mode="bilinear", antialias=True, align_corners=False)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(dev)
            logits = model(x)
            loss = criterion(logits, y)
            if not torch.isfinite(loss):
                raise ErfLabError(f"training diverged at epoch {epoch + 1} (loss {float(loss)}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            step_s = time.perf_counter() - t_step
        bar.close()
        t_val = time.perf_counter()
        val = evaluate(model, sets["val"], device=dev, desc=f"epoch {epoch + 1}/{epochs} val", progress=progress,
                       summary=False)
        seconds = time.perf_counter() - t0
        metrics["train_seconds"] = spent()
        metrics["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                   "train_acc": correct / max(seen, 1), "val_loss": val["loss"],
                                   "val_acc": val["acc"], "lr": opt.param_groups[0]["lr"], "seconds": seconds,
                                   "train_images": seen})
        if stopped:
            metrics["stopped_by_time_budget"] = True
        improved = val["acc"] > metrics["best_val_acc"]
        if improved:
            metrics["best_epoch"], metrics["best_val_acc"] = epoch + 1, val["acc"]
            save_checkpoint(checkpoint(epoch + 1, with_state=False), paths["best"])
        save_checkpoint(checkpoint(epoch + 1, with_state=True), paths["last"])
        write_json(paths["metrics"], metrics, fsync=True)
        reserve = time.perf_counter() - t_val
        metrics["train_seconds"] = spent()
        if progress:
            write_line(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / max(seen, 1):.4f} "
                       f"acc {correct / max(seen, 1):.4f} | val acc {val['acc']:.4f}"
                       f"{' (best)' if improved else ''} | {seconds:.1f}s")
        if stopped:
            break

    # test the best epoch, record it in the best checkpoint, the metrics JSON and the return value
    best = torch.load(paths["best"], map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"])
    test = evaluate(model, sets["test"], device=dev, desc="test", progress=progress)
    metrics.update(test_acc=test["acc"], test_loss=test["loss"], test_acc_per_size_bin=test["acc_per_size_bin"])
    best["metrics"] = json.loads(dumps(metrics))
    save_checkpoint(best, paths["best"])
    write_json(paths["metrics"], metrics, fsync=True)
    return metrics
