"""Run configurations of ``erf-lab figures`` (``--quick`` and ``--full``) and the study models they train.

:func:`prepare_models` trains the six operator variants of one base network with
:func:`erf_lab.train.train`, or takes them from a user's folder, or reuses the checkpoints
cached in the output folder by an earlier run with the same training options (a run that
was interrupted resumes from its ``.last.pt``).
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from erf_lab.errors import ErfLabError

from ._io import PathLike, jsonable, write_json

__all__ = ["FiguresConfig", "config_for", "prepare_models", "OPS"]

OPS: Tuple[str, ...] = ("conv", "dcn", "condconv", "dk_global", "dk", "dk_dcn")
MODES = ("quick", "full")


@dataclass(frozen=True)
class FiguresConfig:
    """Every option of a figures run (recorded in each result's metadata).

    Attributes:
        mode: ``quick`` or ``full``.
        data: the ``--data`` spec the models are trained and analysed on.
        arch, arch_kwargs: the base network (``dk_ops.models`` name and arguments).
        ops: the operator variants.
        seeds: training seeds (the accuracy table averages over them; other figures use the first).
        image_size: input side the models are trained and analysed at (None: the data's own).
        epochs, batch_size, lr, max_train_images, max_eval_images: training options (lr None: the
            trainer's default).
        erf_images: images of each model's data-set ERF.
        instance_per_bin: test images per size bin for the ERF-mass-in-box statistic.
        tsne_samples, tsne_iter: samples (stratified by class and size) and t-SNE iterations.
        offset_images: test images for the offset statistics.
        latency_repeats: timed forward passes per variant (median reported).
        theory_depths: depths of the uniform linear stacks of the theory figure.
    """

    mode: str = "quick"
    data: str = "digits-ms"
    arch: str = "study_net"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ops: Tuple[str, ...] = OPS
    seeds: Tuple[int, ...] = (0,)
    image_size: Optional[int] = None
    epochs: int = 2
    batch_size: int = 64
    lr: Optional[float] = None
    max_train_images: Optional[int] = None
    max_eval_images: Optional[int] = None
    erf_images: int = 32
    instance_per_bin: int = 3
    tsne_samples: int = 400
    tsne_iter: int = 500
    offset_images: int = 100
    latency_repeats: int = 10
    theory_depths: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)

    def to_dict(self) -> Dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def training_key(self, op: str, seed: int) -> Dict[str, Any]:
        """What identifies a trained checkpoint: a cached one is reused only when this matches."""
        return jsonable({"data": self.data, "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs), "op": op,
                         "seed": seed, "image_size": self.image_size, "epochs": self.epochs,
                         "batch_size": self.batch_size, "lr": self.lr,
                         "max_train_images": self.max_train_images, "max_eval_images": self.max_eval_images})


_PRESETS: Dict[str, Dict[str, Any]] = {
    # <= 15 minutes on 2 CPU cores from a fresh install: the default study net at 64x64 (the
    # data's own size), the whole training split (fresh renders every epoch), 10 epochs. The
    # models are trained part of the way (see RESULTS.md for their accuracy), so the figures
    # show the pipeline on real but unconverged models; --full trains them to convergence.
    "quick": dict(arch_kwargs={}, image_size=None, seeds=(0,),
                  epochs=10, max_train_images=None, max_eval_images=300, erf_images=24, instance_per_bin=2,
                  tsne_samples=300, tsne_iter=500, offset_images=100, latency_repeats=10,
                  theory_depths=(1, 2, 4, 8, 16, 32)),
    # the default study net on the whole training split, three seeds.
    "full": dict(arch_kwargs={}, seeds=(0, 1, 2), epochs=20, max_train_images=None, max_eval_images=None,
                 erf_images=200, instance_per_bin=10, tsne_samples=2000, tsne_iter=1000, offset_images=1000,
                 latency_repeats=50, theory_depths=(1, 2, 4, 8, 16, 32, 64, 128)),
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
    for key in ("ops", "seeds", "theory_depths"):
        opts[key] = tuple(opts[key]) if key in opts else getattr(FiguresConfig, key, None)
    bad = [op for op in opts.get("ops", OPS) if op not in OPS]
    if bad:
        raise ErfLabError(f"unknown op(s) {', '.join(bad)}; choose from {', '.join(OPS)}")
    return FiguresConfig(**opts)


def _user_checkpoint(models_dir: Path, op: str, seed: int) -> Optional[Path]:
    names = [f"{op}-seed{seed}.pt", f"{op}_seed{seed}.pt"] + ([f"{op}.pt"] if seed == 0 else [])
    for name in names:
        if (models_dir / name).is_file():
            return models_dir / name
    return None


def prepare_models(config: FiguresConfig, out_dir: PathLike, *, models_dir: Optional[PathLike] = None,
                   device: str = "cpu", progress: bool = True) -> Dict[str, List[Path]]:
    """Checkpoints of every variant, ``{op: [path per seed]}``: trained, cached or the user's.

    Args:
        config: the run configuration (what to train and how).
        out_dir: the run's output folder; trained checkpoints go to ``out_dir/models/OP-seedS.pt``
            beside a ``.figures.json`` with their training options. A later run with the same
            options reuses them without training; an interrupted one resumes.
        models_dir: a folder of the user's checkpoints named ``OP.pt`` (seed 0) or
            ``OP-seedS.pt``; variants missing there are left out (at least one must exist).
        device: training device.
        progress: training progress bars and epoch lines.

    Raises:
        ErfLabError: no checkpoint found in ``models_dir``; training failures.
    """
    from erf_lab.train import companion_paths, train

    out: Dict[str, List[Path]] = {}
    if models_dir is not None:
        md = Path(models_dir)
        if not md.is_dir():
            raise ErfLabError(f"--models {md}: not a folder")
        for op in config.ops:
            paths = [p for p in (_user_checkpoint(md, op, s) for s in config.seeds) if p is not None]
            if paths:
                out[op] = paths
        if not out:
            raise ErfLabError(f"--models {md}: no checkpoint named OP.pt or OP-seedS.pt for OP in "
                              f"{', '.join(config.ops)}")
        return out
    cache = Path(out_dir) / "models"
    for op in config.ops:
        for seed in config.seeds:
            ckpt = cache / f"{op}-seed{seed}.pt"
            stamp = ckpt.with_suffix(".figures.json")
            key = config.training_key(op, seed)
            done = _read_json(stamp)
            if ckpt.is_file() and done == {"key": key, "complete": True}:
                if progress:
                    print(f"  {op} seed {seed}: cached {ckpt}", flush=True)
                out.setdefault(op, []).append(ckpt)
                continue
            resume = done == {"key": key, "complete": False} and companion_paths(ckpt)["last"].is_file()
            if not resume:
                for p in companion_paths(ckpt).values():
                    if p.exists():
                        p.unlink()
            write_json(stamp, {"key": key, "complete": False})
            if progress:
                print(f"  {op} seed {seed}: training {config.epochs} epoch(s){' (resuming)' if resume else ''}",
                      flush=True)
            train(config.arch, op, config.data, config.epochs, ckpt, seed=seed, device=device, resume=resume,
                  batch_size=config.batch_size, lr=config.lr, image_size=config.image_size,
                  arch_kwargs=dict(config.arch_kwargs),
                  max_train_images=config.max_train_images, max_eval_images=config.max_eval_images,
                  progress=progress)
            write_json(stamp, {"key": key, "complete": True})
            out.setdefault(op, []).append(ckpt)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
