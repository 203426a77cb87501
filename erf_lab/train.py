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
sampling-offset generators at 0.03x (docs/experiments.md, *Training defaults*, has the runs
behind these and the other defaults).

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
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from .device import resolve_device
from .errors import ErfLabError
from .io import atomic_write, check_output_file, dumps, versions, write_json
from ._layout import resolve_channels_last, to_channels_last
from .progress import loader_bar, write_line

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


def epoch_path(out_path: PathLike, epoch: int) -> Path:
    """Where ``keep_every`` keeps epoch ``epoch``'s checkpoint: ``epoch_E.pt`` beside OUT (E unpadded:
    ``erf-lab compare --model 'DIR/epoch_*.pt'`` orders the files by the epoch they record)."""
    return Path(out_path).parent / f"epoch_{int(epoch)}.pt"


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


def resize_schedule(spec: Union[str, None, Sequence[Sequence[float]]], arch: Optional[str] = None):
    """``progressive_resize`` as a tuple of ``(until, scale)`` steps (empty: off).

    ``"auto"``: :data:`PROGRESSIVE_RESIZE` for architectures registered with the
    ``progressive_resize`` train hint (the study nets; :func:`dk_ops.models.train_hints`), else
    off. Steps are ``(until, scale)`` pairs (``erf-lab train --progressive-resize 0.3:0.5,0.6:0.75``
    reads as two)."""
    from dk_ops.models import train_hints

    if spec is None or spec in ("off", "none", ""):
        return ()
    if spec == "auto":
        return PROGRESSIVE_RESIZE if arch and train_hints(arch)["progressive_resize"] else ()
    try:
        if isinstance(spec, str):
            raise TypeError(spec)
        steps = tuple((float(until), float(scale)) for until, scale in spec)
    except (TypeError, ValueError):
        raise ErfLabError(f"progressive resize must be 'auto', 'off' or (until, scale) steps, got {spec!r}") from None
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


# ---- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains: every option after the arch, op, data, epochs and output file.
    Checked on construction (one-line :class:`ErfLabError`).

    Attributes:
        seed: seeds the model initialisation, shuffling and augmentation.
        device: ``cpu``, ``cuda[:i]`` or ``auto``.
        resume: continue from ``OUT.last.pt`` (or ``OUT``) when it exists.
        lr: peak learning rate (default 6e-3 for AdamW, 0.1 for SGD).
        batch_size, num_workers: of the training loader; ``num_workers="auto"``: none (a fresh
            ``digits-ms`` batch renders in the training process; on 2 cores a worker only
            competes with the training threads). Results do not depend on the number of workers.
        optimizer: ``adamw`` or ``sgd`` (Nesterov momentum 0.9).
        weight_decay: default 0.05 (AdamW) or 5e-4 (SGD); never on biases and norms.
        warmup_epochs: linear warm-up length, in epochs.
        offset_lr_mult: learning-rate factor of the offset generators (the
            ``*kernel_offset_generator*`` parameters of DK layers and the
            ``*offset_generator*`` ones of DCN layers); ``"auto"``: :data:`OFFSET_LR_MULT`.
        label_smoothing: of the cross-entropy loss.
        augment: random shifts of up to 1/16 of the image side.
        size_curriculum_epochs: for epochs ``1..E`` the fresh ``digits-ms`` renders' object
            sizes start at :data:`CURRICULUM_START` x side (large objects only) and the floor
            falls log-linearly to the full range's 0.12 x side at epoch ``E + 1`` (epoch 0
            reads the cached, full-range renders; val and test are never changed). ``"auto"``:
            a sixth of the run (with ``time_budget_s``: of the epochs the first epoch's duration
            predicts), at most 6 epochs, for architectures registered with the
            ``size_curriculum`` train hint (MobileNetV2) on data that renders on the fly (fresh
            ``digits-ms``), else 0.
        time_budget_s: train for this many seconds of wall time (training, per-epoch
            validation and checkpoint writes; ``metrics["train_seconds"]``) instead of a fixed
            number of epochs (:class:`TimeBudget`): the cosine schedule runs over the fraction of
            the budget spent (or of the epochs, whichever is further along), and training
            stops, mid-epoch if need be, early enough to validate and write the last epoch
            within the budget. Results then depend on the machine's speed; runs with the same
            seed are not repeatable.
        progressive_resize: train on downscaled images early in the run (antialiased
            bilinear resizing of each batch; validation and test at full size): ``(until,
            scale)`` steps, e.g. ``((0.3, 0.5), (0.6, 0.75))`` trains at half the side until
            30% of the run (fraction of the epochs, or of ``time_budget_s`` when further along),
            at 3/4 until 60%, then at full size. ``"auto"``: :data:`PROGRESSIVE_RESIZE` for
            architectures registered with the ``progressive_resize`` train hint (the study
            nets), else off.
        channels_last: train in channels-last memory format (model and batches). ``"auto"``:
            on CPU for models with 2-D convolutions (:func:`erf_lab._layout.channels_last_pays`:
            oneDNN's convolutions and BatchNorm are faster there; CondConv's 5-D expert bank
            stays as it is and its grouped convolution runs in the default format). Results
            differ only by float rounding; checkpoints are saved in the default format.
        image_size, channels: passed to ``open_data``.
        arch_kwargs: extra model arguments (e.g. ``{"width_mult": 0.5}``).
        max_train_images, max_eval_images: seeded subsets, for quick runs.
        keep_every: also keep every K-th epoch's checkpoint (and the initial weights as epoch 0, and
            the last epoch) as :func:`epoch_path` ``epoch_E.pt`` beside OUT, without optimizer
            state: a training trajectory for ``erf-lab compare``. Does not change the weights.
        skip_bad: skip undecodable images.
        progress: one line per epoch (stdout); tqdm bars on a terminal, and when stderr is
            not one, a line for the final test instead (:func:`erf_lab.progress.progress`).
    """

    seed: int = 0
    device: Union[str, torch.device] = "cpu"
    resume: bool = False
    lr: Optional[float] = None
    batch_size: int = 64
    num_workers: Union[int, str] = "auto"
    optimizer: str = "adamw"
    weight_decay: Optional[float] = None
    warmup_epochs: float = 0.5
    offset_lr_mult: Union[float, str] = "auto"
    label_smoothing: float = 0.0
    augment: bool = True
    size_curriculum_epochs: Union[int, str] = "auto"
    time_budget_s: Optional[float] = None
    progressive_resize: Union[str, None, Sequence[Sequence[float]]] = "auto"
    channels_last: Union[bool, str] = "auto"
    image_size: Union[int, Sequence[int], None] = None
    channels: int = 3
    arch_kwargs: Optional[Dict[str, Any]] = None
    max_train_images: Optional[int] = None
    max_eval_images: Optional[int] = None
    keep_every: Optional[int] = None
    skip_bad: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ErfLabError(f"batch size must be >= 1, got {self.batch_size}")
        w = self.num_workers
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ErfLabError(f"num_workers must be an integer >= 0 or 'auto', got {w!r}")
        c = self.size_curriculum_epochs
        if c != "auto" and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ErfLabError(f"size_curriculum_epochs must be an integer >= 0 or 'auto', got {c!r}")
        b = self.time_budget_s
        if b is not None and not (isinstance(b, (int, float)) and b > 0):
            raise ErfLabError(f"time budget must be a positive number of seconds, got {b!r}")
        m = self.offset_lr_mult
        if m != "auto" and (isinstance(m, (str, bool)) or not m >= 0):
            raise ErfLabError(f"offset_lr_mult must be a number >= 0 or 'auto', got {m!r}")
        k = self.keep_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ErfLabError(f"keep_every must be an integer >= 1, got {k!r}")
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        if self.optimizer not in ("adamw", "sgd"):
            raise ErfLabError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (6e-3 if self.optimizer == "adamw" else 0.1)

    @property
    def decay(self) -> float:
        """The weight decay of weights (biases and norms get none)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.optimizer == "adamw" else 5e-4

    @property
    def offset_mults(self) -> Dict[str, float]:
        """Learning-rate factor per offset kind (``kernel``: DK, ``sampling``: DCN)."""
        if self.offset_lr_mult == "auto":
            return dict(OFFSET_LR_MULT)
        return dict.fromkeys(OFFSET_LR_MULT, float(self.offset_lr_mult))


class TimeBudget:
    """The run's wall clock (training, validation and checkpoint writes) and, with a budget, when
    to stop: before an epoch or a step that would leave too little time to validate and write
    the last epoch (its validation and writes, ``reserve``, and two steps are kept back)."""

    def __init__(self, budget_s: Optional[float]) -> None:
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.reserve = 0.0  # the last epoch's validation and checkpoint time
        self.step_s = 0.0  # the last training step's time

    def resume(self, spent_before: float) -> None:
        """Continue the clock of a resumed run from the seconds it had spent."""
        self.start = time.perf_counter() - spent_before

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def fraction(self) -> float:
        """Fraction of the budget spent (0 without a budget)."""
        return 0.0 if self.budget_s is None else self.spent() / self.budget_s

    def stop_before_epoch(self, epochs_done: int) -> bool:
        return self.budget_s is not None and epochs_done > 0 and self.spent() + 1.25 * self.reserve >= self.budget_s

    def stop_before_step(self, images_seen: int) -> bool:
        return (self.budget_s is not None and images_seen > 0
                and self.spent() + 1.25 * self.reserve + 2 * self.step_s >= self.budget_s)


def param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    """Optimizer groups: (ordinary, DK kernel-offset, DCN sampling-offset parameters) x (weights,
    with decay; biases and norms, without), each offset kind at its learning-rate factor."""
    mults, groups = config.offset_mults, []
    for kind in (None, "kernel", "sampling"):
        for decays in (True, False):
            params = [p for n, p in model.named_parameters() if _offset_kind(n) == kind and (p.ndim > 1) == decays]
            if params:
                groups.append({"params": params, "weight_decay": config.decay if decays else 0.0,
                               "lr": config.peak_lr * (1.0 if kind is None else mults[kind])})
    return groups


# ---- the run ---------------------------------------------------------------------------------
class _Run:
    """One training run's state: data, model, optimizer, schedule, clock and metrics."""

    def __init__(self, arch: str, op: str, data_spec: str, epochs: int, cfg: TrainConfig, dev: torch.device,
                 paths: Dict[str, Path], state: Optional[Dict[str, Any]]) -> None:
        from dk_ops import models

        self.arch, self.data_spec, self.epochs, self.cfg, self.paths, self.dev = arch, data_spec, epochs, cfg, paths, dev
        self.base, self.sets = training_splits(data_spec, cfg.image_size, cfg.channels, cfg.seed, cfg.max_train_images,
                                               cfg.max_eval_images, cfg.skip_bad)
        self.workers = 0 if cfg.num_workers == "auto" else cfg.num_workers
        self.h, self.w = self.base.image_size
        torch.manual_seed(cfg.seed)
        kwargs = dict(cfg.arch_kwargs or {})
        if cfg.channels != 3:
            kwargs.setdefault("in_chans", cfg.channels)
        self.model = models.create(arch, op=op, num_classes=self.base.num_classes, **kwargs)
        self.full_kwargs = dict(self.model.arch_kwargs)
        self._plan_curriculum(models.train_hints(arch)["size_curriculum"])
        self.resize_steps = resize_schedule(cfg.progressive_resize, arch)
        cx = models.complexity(self.model, input_size=(cfg.channels, self.h, self.w))
        self.model.to(self.dev)
        self.channels_last = resolve_channels_last(cfg.channels_last, self.model, self.dev)
        if self.channels_last:
            to_channels_last(self.model)
        groups = param_groups(self.model, cfg)
        self.opt = (torch.optim.AdamW(groups, lr=cfg.peak_lr, fused=True) if cfg.optimizer == "adamw"
                    else torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=0.9, nesterov=True))
        steps = math.ceil(len(self.sets["train"]) / cfg.batch_size)
        self.clock = TimeBudget(cfg.time_budget_s)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(
            int(cfg.warmup_epochs * steps), epochs * steps, None if cfg.time_budget_s is None else self.clock.fraction))
        self.train_args = self._train_args()
        self.metrics: Dict[str, Any] = {
            "history": [], "best_epoch": 0, "best_val_acc": -1.0, "train_seconds": 0.0, "params": int(cx["params"]),
            "macs": int(cx["macs"]), "num_train": len(self.sets["train"]), "num_val": len(self.sets["val"]),
            "num_test": len(self.sets["test"])}
        self.start_epoch = 0
        if state is not None:
            self._load(state)
        self.clock.resume(self.metrics["train_seconds"])

    def _plan_curriculum(self, wanted: bool) -> None:
        """The size curriculum's length; "auto" under a time budget waits for the first epoch's time."""
        cfg, can = self.cfg, self.base.renders_on_the_fly
        self.curriculum_pending = False
        self.curriculum = cfg.size_curriculum_epochs
        if self.curriculum == "auto":
            wants = can and wanted
            self.curriculum_pending = wants and cfg.time_budget_s is not None
            self.curriculum = auto_curriculum_epochs(self.epochs) if wants and not self.curriculum_pending else 0
        if self.curriculum and not can:
            raise ErfLabError(f"a size curriculum needs fresh digits-ms renders (digits-ms with fresh=1), "
                              f"not {self.data_spec!r}")

    def _train_args(self) -> Dict[str, Any]:
        cfg = self.cfg
        return dict(optimizer=cfg.optimizer, lr=cfg.peak_lr, weight_decay=cfg.decay, batch_size=cfg.batch_size,
                    epochs=self.epochs, warmup_epochs=cfg.warmup_epochs, offset_lr_mult=cfg.offset_mults,
                    label_smoothing=cfg.label_smoothing, augment=cfg.augment, size_curriculum_epochs=self.curriculum,
                    time_budget_s=cfg.time_budget_s, progressive_resize=[list(step) for step in self.resize_steps],
                    channels_last=bool(self.channels_last), seed=cfg.seed, max_train_images=cfg.max_train_images,
                    max_eval_images=cfg.max_eval_images, device=str(self.dev))

    def _load(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.metrics = state["metrics"]
        self.start_epoch = int(state["epoch"])
        if self.curriculum_pending and self.start_epoch >= 1:
            self.curriculum = int(state["train_args"].get("size_curriculum_epochs") or 0)
            self.curriculum_pending = False
            self.train_args["size_curriculum_epochs"] = self.curriculum

    def checkpoint(self, epoch: int, with_state: bool) -> Dict[str, Any]:
        """The checkpoint dict (module docstring; docs/design.md section 4)."""
        base = self.base
        ckpt: Dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": self.arch,
            "arch_kwargs": self.full_kwargs,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            "data_spec": self.data_spec, "class_names": list(base.class_names),
            "size_bin_edges": None if base.size_bin_edges is None else list(base.size_bin_edges),
            "normalization": {"mean": list(base.mean), "std": list(base.std)},
            "input_size": [self.cfg.channels, self.h, self.w], "metrics": json.loads(dumps(self.metrics)),
            "epoch": epoch, "versions": versions(), "train_args": dict(self.train_args),
        }
        if with_state:
            ckpt["optimizer"] = self.opt.state_dict()
            ckpt["scheduler"] = self.sched.state_dict()
            ckpt["rng"] = {"torch": torch.get_rng_state(), "seed": self.cfg.seed, "epoch": epoch}
        return ckpt

    def epoch(self, epoch: int) -> bool:
        """Trains, validates and saves ``epoch`` (0-based); returns whether the time budget stopped it."""
        cfg, metrics, t0 = self.cfg, self.metrics, time.perf_counter()
        if self.curriculum_pending and epoch >= 1:
            estimated = min(self.epochs, int(cfg.time_budget_s / max(metrics["history"][0]["seconds"], 1e-9)))
            self.curriculum = self.train_args["size_curriculum_epochs"] = auto_curriculum_epochs(estimated)
            self.curriculum_pending = False
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout-like randomness inside the model
        # separate streams: a loader with workers draws its order ahead of the steps' shifts
        gen = torch.Generator().manual_seed(cfg.seed * 100_019 + epoch)
        order = torch.Generator().manual_seed(cfg.seed * 100_043 + epoch)
        self.base.set_epoch(epoch)  # fresh digits-ms renders; a no-op for other sources
        if self.curriculum:
            self.base.set_size_floor(size_floor(epoch, self.curriculum))
        loss_sum, correct, seen, stopped = self._steps(epoch, gen, order)
        t_val = time.perf_counter()
        val = evaluate(self.model, self.sets["val"], device=self.dev, desc=f"epoch {epoch + 1}/{self.epochs} val",
                       progress=cfg.progress, summary=False)
        seconds = time.perf_counter() - t0
        metrics["train_seconds"] = self.clock.spent()
        metrics["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                   "train_acc": correct / max(seen, 1), "val_loss": val["loss"],
                                   "val_acc": val["acc"], "lr": self.opt.param_groups[0]["lr"], "seconds": seconds,
                                   "train_images": seen})
        if stopped:
            metrics["stopped_by_time_budget"] = True
        improved = val["acc"] > metrics["best_val_acc"]
        if improved:
            metrics["best_epoch"], metrics["best_val_acc"] = epoch + 1, val["acc"]
            save_checkpoint(self.checkpoint(epoch + 1, with_state=False), self.paths["best"])
        save_checkpoint(self.checkpoint(epoch + 1, with_state=True), self.paths["last"])
        self.keep(epoch + 1, last=stopped or epoch + 1 == self.epochs)
        write_json(self.paths["metrics"], metrics, fsync=True)
        self.clock.reserve = time.perf_counter() - t_val
        metrics["train_seconds"] = self.clock.spent()
        if cfg.progress:
            write_line(f"epoch {epoch + 1}/{self.epochs}: train loss {loss_sum / max(seen, 1):.4f} "
                       f"acc {correct / max(seen, 1):.4f} | val acc {val['acc']:.4f}"
                       f"{' (best)' if improved else ''} | {seconds:.1f}s")
        return stopped

    def keep(self, done: int, last: bool = False) -> None:
        """With ``keep_every``: the checkpoint after ``done`` epochs as ``epoch_<done>.pt`` when ``done``
        is 0, a multiple of it, or the ``last`` epoch."""
        k = self.cfg.keep_every
        if k and (done % k == 0 or last):
            save_checkpoint(self.checkpoint(done, with_state=False), epoch_path(self.paths["best"], done))

    def _steps(self, epoch: int, gen: torch.Generator, order: torch.Generator) -> Tuple[float, int, int, bool]:
        """The epoch's optimizer steps: (loss sum, correct, images seen, stopped by the budget)."""
        cfg, model, (h, w) = self.cfg, self.model, (self.h, self.w)
        train_set = self.sets["train"]
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=order,
                            num_workers=self.workers, drop_last=len(train_set) > cfg.batch_size)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        max_shift = max(1, min(h, w) // 16) if cfg.augment else 0
        model.train()
        res = train_resolution(max(epoch / self.epochs, self.clock.fraction()), self.resize_steps, (h, w))
        loss_sum, correct, seen, stopped = 0.0, 0, 0, False
        bar = loader_bar(loader, desc=f"epoch {epoch + 1}/{self.epochs} train", leave=False, enabled=cfg.progress,
                         summary=False)  # the epoch line says it
        for batch in bar:
            if self.clock.stop_before_step(seen):
                stopped = True
                break
            t_step = time.perf_counter()
            x = _shift(batch["image"], max_shift, gen).to(self.dev)
            if res != (h, w):
                x = F.interpolate(x, size=res, mode="bilinear", antialias=True, align_corners=False)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(self.dev)
            logits = model(x)
            loss = criterion(logits, y)
            if not torch.isfinite(loss):
                raise ErfLabError(f"training diverged at epoch {epoch + 1} (loss {float(loss)}); "
                                  "lower the learning rate (lr, --lr)")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            self.clock.step_s = time.perf_counter() - t_step
        bar.close()
        return loss_sum, correct, seen, stopped

    def test(self) -> Dict[str, Any]:
        """Tests the best epoch and records it in the best checkpoint, the metrics JSON and the metrics."""
        best = torch.load(self.paths["best"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(best["state_dict"])
        test = evaluate(self.model, self.sets["test"], device=self.dev, desc="test", progress=self.cfg.progress)
        self.metrics.update(test_acc=test["acc"], test_loss=test["loss"], test_acc_per_size_bin=test["acc_per_size_bin"])
        best["metrics"] = json.loads(dumps(self.metrics))
        save_checkpoint(best, self.paths["best"])
        write_json(self.paths["metrics"], self.metrics, fsync=True)
        return self.metrics


def train(arch: str, op: str = "conv", data_spec: str = "digits-ms", epochs: Optional[int] = None,
          out_path: PathLike = "checkpoint.pt", *, config: Optional[TrainConfig] = None, **options: Any) -> Dict[str, Any]:
    """Train ``arch`` with operator ``op`` on ``data_spec``; write checkpoints; return the metrics.

    Args:
        arch: a ``dk_ops.models`` name (``study_net``, ``mobilenet_v2``, ``resnet50_dw``).
        op: ``conv``, ``dcn``, ``condconv``, ``dk_global``, ``dk`` or ``dk_dcn``.
        data_spec: any ``--data`` spec with labels (see :func:`erf_lab.data.open_data`).
        epochs: total epochs (with ``resume``, the run continues up to this many); with
            ``time_budget_s``, the most epochs. Default 10, or 1000 with a time budget.
        out_path: the best checkpoint; ``.last.pt`` and ``.metrics.json`` go beside it.
        config, options: a :class:`TrainConfig`, and/or its fields as keywords (``seed=1``,
            ``lr=3e-3``...), which override the config's.

    Returns:
        the metrics dict (also in the checkpoint and ``OUT.metrics.json``): per-epoch
        ``history``, ``best_epoch``, ``best_val_acc``, ``test_acc``, ``test_acc_per_size_bin``,
        ``train_seconds`` (wall time of training, validation and checkpoint writes, excluding
        the final test), ``params`` and ``macs``.
    """
    from dk_ops import models

    if op not in models.OPS:
        raise ErfLabError(f"unknown op {op!r}; choose one of {', '.join(models.OPS)}")
    if arch not in models.names():
        raise ErfLabError(f"unknown arch {arch!r}; choose one of {', '.join(models.names())}")
    cfg = dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
    if epochs is None:
        epochs = 10 if cfg.time_budget_s is None else 1000
    if epochs < 1:
        raise ErfLabError(f"epochs must be >= 1, got {epochs}")
    dev = resolve_device(cfg.device)  # a missing CUDA fails before any file is touched
    paths = companion_paths(out_path)
    for p in list(paths.values()) + ([epoch_path(out_path, 0)] if cfg.keep_every else []):
        check_output_file(p)  # before any work: an unwritable output fails now, not after training
    state = _load_resume(paths) if cfg.resume else None
    if state is not None and (state["arch"], state["arch_kwargs"].get("op"), state["data_spec"]) != (arch, op, data_spec):
        raise ErfLabError(f"{paths['last']}: was trained as {state['arch']}/{state['arch_kwargs'].get('op')} on "
                          f"{state['data_spec']!r}, not {arch}/{op} on {data_spec!r}; use another output file")
    run = _Run(arch, op, data_spec, epochs, cfg, dev, paths, state)
    if run.start_epoch == 0:
        run.keep(0)  # the initial weights: the trajectory's first point
    for epoch in range(run.start_epoch, epochs):
        if run.clock.stop_before_epoch(len(run.metrics["history"])):
            run.metrics["stopped_by_time_budget"] = True
            break
        if run.epoch(epoch):
            break
    return run.test()
