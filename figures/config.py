"""Run configurations of ``erf-lab figures`` (``--quick`` and ``--full``) and the study models they train.

The models of a run (:func:`prepare_models`): the six operator variants of the study net and
the t-SNE network's variants, each over several seeds. They are the converged checkpoints
shipped in ``erf_lab/study_models`` (``--quick``, the default), or trained by the run with
:func:`erf_lab.train.train` (``--retrain``, ``--full``; cached in the output folder and reused
by a later run with the same training options, resumed when interrupted), or a user's folder
(``--models DIR``).
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from dk_ops.models import OPS as _ZOO_OPS
from erf_lab.errors import ErfLabError
from erf_lab.io import PathLike, jsonable, write_json

__all__ = ["FiguresConfig", "config_for", "prepare_models", "OPS"]

OPS: Tuple[str, ...] = tuple(_ZOO_OPS)  # every operator of the zoo, in its order
TSNE_OPS: Tuple[str, ...] = ("condconv", "dk", "conv")
SOURCES = ("shipped", "train")
MODES = ("quick", "full")


@dataclass(frozen=True)
class FiguresConfig:
    """Every option of a figures run (recorded in each result's metadata).

    Attributes:
        mode: ``quick`` or ``full``.
        data: the ``--data`` spec the models are trained and analysed on.
        source: ``shipped`` (the models in ``erf_lab/study_models``, no training) or ``train``
            (trained by the run, cached in ``OUT/models``).
        arch, arch_kwargs: the base network (``dk_ops.models`` name and arguments).
        ops: the operator variants.
        seeds: training seeds; every statistic pools them (``figures.stats``).
        image_size: input side the models are trained and analysed at (None: the data's own).
        epochs, batch_size, lr, max_train_images, max_eval_images: training options (lr None: the
            trainer's default).
        tsne_arch, tsne_arch_kwargs, tsne_ops, tsne_seeds, tsne_epochs: the t-SNE figure's network
            (the paper's MobileNetV2, width 0.5), its variants, seeds and training epochs.
        erf_images: images of each model's data-set ERF.
        instance_per_bin: test images per size bin for the instance-ERF and kernel statistics
            (the same images for every model and seed).
        tsne_samples, tsne_iter, tsne_runs: samples (stratified by class and size), t-SNE
            iterations, and t-SNE seeds per model.
        offset_images: unused since the offset statistics read the instance images (kept for
            old run.json files).
        latency_repeats: timed forward passes per variant (median reported).
        theory_depths: depths of the uniform linear stacks of the theory figure.
        n_boot: bootstrap replicates of every confidence interval.
    """

    mode: str = "quick"
    data: str = "digits-ms"
    source: str = "shipped"
    arch: str = "study_net"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ops: Tuple[str, ...] = OPS
    seeds: Tuple[int, ...] = (0, 1, 2)
    image_size: Optional[int] = None
    epochs: int = 50
    batch_size: int = 64
    lr: Optional[float] = None
    max_train_images: Optional[int] = None
    max_eval_images: Optional[int] = None
    tsne_arch: str = "mobilenet_v2"
    tsne_arch_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"width_mult": 0.5})
    tsne_ops: Tuple[str, ...] = TSNE_OPS
    tsne_seeds: Tuple[int, ...] = (0, 1)
    tsne_epochs: int = 40
    erf_images: int = 32
    instance_per_bin: int = 50
    tsne_samples: int = 1000
    tsne_iter: int = 500
    tsne_runs: int = 2
    offset_images: int = 100
    latency_repeats: int = 10
    theory_depths: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    n_boot: int = 2000

    def to_dict(self) -> Dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def training_key(self, op: str, seed: int, tsne: bool = False) -> Dict[str, Any]:
        """What identifies a trained checkpoint: a cached one is reused only when this matches."""
        from erf_lab.study_models import op_kwargs, op_train_kwargs

        arch, kwargs, epochs = self.network(tsne)
        return jsonable({"data": self.data, "arch": arch, "arch_kwargs": {**op_kwargs(arch, op), **dict(kwargs)}, "op": op,
                         "seed": seed, "image_size": self.image_size, "epochs": epochs,
                         "batch_size": self.batch_size, "lr": self.lr,
                         "offset_lr_mult": op_train_kwargs(arch, op).get("offset_lr_mult"),
                         "max_train_images": self.max_train_images, "max_eval_images": self.max_eval_images})

    def network(self, tsne: bool = False) -> Tuple[str, Mapping[str, Any], int]:
        """``(arch, arch_kwargs, epochs)`` of the study net, or of the t-SNE network with ``tsne``."""
        if tsne:
            return self.tsne_arch, self.tsne_arch_kwargs, self.tsne_epochs
        return self.arch, self.arch_kwargs, self.epochs


_PRESETS: Dict[str, Dict[str, Any]] = {
    # The shipped converged models (no training): the statistics at the sizes the claims need
    # (50 test images per size bin, 1,000 t-SNE samples, every seed); minutes on 2 CPU cores.
    "quick": dict(source="shipped", erf_images=32, instance_per_bin=50, tsne_samples=1000, tsne_iter=500,
                  tsne_runs=2, latency_repeats=10, n_boot=2000, theory_depths=(1, 2, 4, 8, 16, 32)),
    # Everything trained anew with the shipped models' recipes, and larger statistics.
    "full": dict(source="train", erf_images=200, instance_per_bin=100, tsne_samples=2000, tsne_iter=1000,
                 tsne_runs=3, latency_repeats=50, n_boot=5000, theory_depths=(1, 2, 4, 8, 16, 32, 64, 128)),
}


def config_for(mode: str = "quick", **overrides: Any) -> FiguresConfig:
    """The ``quick`` or ``full`` configuration, with single options replaced by ``overrides``."""
    if mode not in MODES:
        raise ErfLabError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    opts = dict(_PRESETS[mode], mode=mode)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(FiguresConfig)}
    if unknown:
        raise ErfLabError(f"unknown figures option(s): {', '.join(sorted(unknown))}")
    opts.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("ops", "seeds", "theory_depths", "tsne_ops", "tsne_seeds"):
        opts[key] = tuple(opts[key]) if key in opts else getattr(FiguresConfig, key, None)
    if opts.get("source", "shipped") not in SOURCES:
        raise ErfLabError(f"source must be one of {', '.join(SOURCES)}, got {opts['source']!r}")
    bad = [op for op in opts.get("ops", OPS) + opts.get("tsne_ops", TSNE_OPS) if op not in OPS]
    if bad:
        raise ErfLabError(f"unknown op(s) {', '.join(bad)}; choose from {', '.join(OPS)}")
    return FiguresConfig(**opts)


def _user_checkpoint(models_dir: Path, arch: str, op: str, seed: int, tsne: bool) -> Optional[Path]:
    names = [f"{arch}-{op}-s{seed}.pt"]
    if not tsne:  # the study net may also go by OP.pt / OP-seedS.pt
        names += [f"{op}-seed{seed}.pt", f"{op}_seed{seed}.pt"] + ([f"{op}.pt"] if seed == 0 else [])
    for name in names:
        if (models_dir / name).is_file():
            return models_dir / name
    return None


def prepare_models(config: FiguresConfig, out_dir: PathLike, *, models_dir: Optional[PathLike] = None,
                   device: str = "cpu", progress: bool = True, tsne: bool = False,
                   notes: Optional[List[str]] = None, jobs: int = 1) -> Dict[str, List[Path]]:
    """Checkpoints of every variant, ``{op: [path per seed]}``: shipped, trained, cached or the user's.

    Args:
        config: the run configuration (where the models come from, what to train and how).
        out_dir: the run's output folder; trained checkpoints go to ``out_dir/models/OP-seedS.pt``
            (``ARCH-OP-sS.pt`` for the t-SNE network) beside a ``.figures.json`` with their
            training options. A later run with the same options reuses them without training;
            an interrupted one resumes.
        models_dir: a folder of the user's checkpoints named ``ARCH-OP-sS.pt`` (the shipped
            names), or for the study net ``OP.pt`` (seed 0) / ``OP-seedS.pt``; variants
            missing there are left out (at least one must exist).
        device: training device.
        progress: training progress bars and epoch lines.
        tsne: the t-SNE network's variants (``config.tsne_*``) instead of the study net's.
        notes: collects report lines (shipped seeds left out because a variant lacks them).
        jobs: train that many models at once in worker processes (CPU only; each gets
            ``cpus // jobs`` torch threads).

    Raises:
        ErfLabError: no checkpoint found in ``models_dir``; shipped models missing; training failures.
    """
    arch, arch_kwargs, epochs = config.network(tsne)
    ops, seeds = (config.tsne_ops, config.tsne_seeds) if tsne else (config.ops, config.seeds)
    out: Dict[str, List[Path]] = {}
    if models_dir is not None:
        md = Path(models_dir)
        if not md.is_dir():
            raise ErfLabError(f"models_dir {md} (--models): not a folder")
        for op in ops:
            paths = [p for p in (_user_checkpoint(md, arch, op, s, tsne) for s in seeds) if p is not None]
            if paths:
                out[op] = paths
        if not out:
            names = f"{arch}-OP-sSEED.pt" + ("" if tsne else " or OP.pt / OP-seedS.pt")
            raise ErfLabError(f"models_dir {md} (--models): no checkpoint named {names} for OP in {', '.join(ops)}")
        return out
    if config.source == "shipped":
        return _shipped(arch, ops, seeds, notes)
    return _trained(config, Path(out_dir) / "models", arch, arch_kwargs, epochs, ops, seeds, tsne, device, progress,
                    jobs)


def _shipped(arch: str, ops: Sequence[str], seeds: Sequence[int], notes: Optional[List[str]] = None) -> Dict[str, List[Path]]:
    """The shipped checkpoints of the requested seeds that every variant has (statistics pair the
    variants seed by seed); a missing seed is left out with a note, no complete seed is an error."""
    from erf_lab import study_models

    def path(op: str, seed: int) -> Path:
        return study_models.SHIPPED_DIR / f"{arch}-{op}-s{seed}.pt"

    complete = [s for s in seeds if all(path(op, s).is_file() for op in ops)]
    missing = [path(op, s).stem for s in seeds for op in ops if not path(op, s).is_file()]
    if not complete:
        raise ErfLabError(f"shipped study models missing: {', '.join(missing)} (retrain them with "
                          "`python scripts/train_study_models.py`, or train here with --retrain)")
    if missing and notes is not None:
        notes.append(f"{arch}: seed(s) {', '.join(str(s) for s in seeds if s not in complete)} left out: "
                     f"not shipped for every variant ({', '.join(missing)} missing; "
                     "`python scripts/train_study_models.py` trains them).")
    return {op: [path(op, s) for s in complete] for op in ops}


def _trained(config: FiguresConfig, cache: Path, arch: str, arch_kwargs: Mapping[str, Any], epochs: int,
             ops: Sequence[str], seeds: Sequence[int], tsne: bool, device: str, progress: bool,
             jobs: int = 1) -> Dict[str, List[Path]]:
    from erf_lab.train import companion_paths

    todo: List[Tuple[str, int, Path, bool]] = []
    for op in ops:
        for seed in seeds:
            ckpt = cache / (f"{arch}-{op}-s{seed}.pt" if tsne else f"{op}-seed{seed}.pt")
            stamp = ckpt.with_suffix(".figures.json")
            key = config.training_key(op, seed, tsne)
            done = _read_json(stamp)
            if ckpt.is_file() and done == {"key": key, "complete": True}:
                if progress:
                    print(f"  {arch} {op} seed {seed}: cached {ckpt}", flush=True)
                continue
            resume = done == {"key": key, "complete": False} and companion_paths(ckpt)["last"].is_file()
            todo.append((op, seed, ckpt, resume))
    args = [(config, arch, dict(arch_kwargs), epochs, op, seed, ckpt, resume, tsne, device) for op, seed, ckpt, resume in todo]
    if jobs <= 1 or len(args) <= 1 or not str(device).startswith("cpu"):
        for a in args:
            _train_one(*a, progress=progress)
    else:
        _train_parallel(args, jobs, progress)
    return {op: [cache / (f"{arch}-{op}-s{s}.pt" if tsne else f"{op}-seed{s}.pt") for s in seeds] for op in ops}


def _train_one(config: FiguresConfig, arch: str, arch_kwargs: Dict[str, Any], epochs: int, op: str, seed: int,
               ckpt: Path, resume: bool, tsne: bool, device: str, progress: bool = True,
               threads: Optional[int] = None) -> float:
    """Trains one variant into ``ckpt`` (stamped incomplete until it finishes); returns seconds."""
    import time

    import torch

    from erf_lab.study_models import op_kwargs, op_train_kwargs
    from erf_lab.train import companion_paths, train

    if threads is not None:
        torch.set_num_threads(threads)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    stamp = ckpt.with_suffix(".figures.json")
    key = config.training_key(op, seed, tsne)
    if not resume:
        for p in companion_paths(ckpt).values():
            if p.exists():
                p.unlink()
    write_json(stamp, {"key": key, "complete": False})
    if progress:
        print(f"  {arch} {op} seed {seed}: training {epochs} epoch(s){' (resuming)' if resume else ''}", flush=True)
    start = time.perf_counter()
    train(arch, op, config.data, epochs, ckpt, seed=seed, device=device, resume=resume,
          batch_size=config.batch_size, lr=config.lr, image_size=config.image_size,
          arch_kwargs={**op_kwargs(arch, op), **arch_kwargs},  # the shipped recipes' per-op arguments
          offset_lr_mult=op_train_kwargs(arch, op).get("offset_lr_mult", "auto"),
          max_train_images=config.max_train_images, max_eval_images=config.max_eval_images,
          progress=progress and threads is None)
    write_json(stamp, {"key": key, "complete": True})
    return time.perf_counter() - start


def _train_parallel(args: List[Tuple[Any, ...]], jobs: int, progress: bool) -> None:
    """Trains the variants in ``jobs`` worker processes of ``cpus // jobs`` torch threads each, the
    slowest (MobileNetV2, DK) first; on small networks this beats one process with every thread."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    cost = {"conv": 1, "dcn": 2, "condconv": 3, "dk_global": 3, "dk": 4, "dk_dcn": 5}
    args = sorted(args, key=lambda a: -cost.get(a[4], 3))
    if progress:
        print(f"  training {len(args)} model(s) in {jobs} processes of {threads} thread(s)", flush=True)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_train_one, *a, progress=progress, threads=threads): a for a in args}
        failed: List[str] = []
        for fut in as_completed(futures):
            a = futures[fut]
            try:
                seconds = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported together below, the others go on
                failed.append(f"{a[1]} {a[4]} seed {a[5]}: {type(exc).__name__}: {exc}")
                continue
            if progress:
                print(f"  {a[1]} {a[4]} seed {a[5]}: trained in {seconds / 60:.1f} min", flush=True)
    if failed:
        raise ErfLabError("training failed: " + "; ".join(failed))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
