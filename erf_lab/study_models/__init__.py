"""The study models shipped with erf-lab: converged digits-ms checkpoints of every operator variant.

Each file here is an ordinary erf-lab checkpoint (``torch.load(path, weights_only=True)``
reads it; ``docs/design.md`` section 4 has the format; section 6 this package) whose ``study`` entry records how it
was made: the recipe, the equivalent ``erf-lab train`` command, the seed, the versions, and its
test accuracy measured on the shipped (compact) weights, overall and on :data:`SUBSET_SIZE`
fixed test images that ``tests`` re-measure. ``scripts/train_study_models.py`` retrains them (through :mod:`.shipping`).

Names are ``ARCH-OP-sSEED`` (``study_net-dk-s0``, ``mobilenet_v2-condconv-s1``); the model
spec ``study:NAME`` may leave out the arch (``study_net``) and the seed (``s0``):
``study:dk``, ``study:dk-s2``, ``study:mobilenet_v2-dk``.
"""
import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from dk_ops.models import OPS

from ..errors import ErfLabError

__all__ = ["Recipe", "RECIPES", "SHIPPED_DIR", "SUBSET_SIZE", "SPEC_PREFIX", "available", "resolve",
           "is_spec", "op_kwargs", "op_train_kwargs", "study_info", "shipped_recipe"]

SHIPPED_DIR = Path(__file__).resolve().parent
SPEC_PREFIX = "study:"
SUBSET_SIZE = 300  # the first test images of each model's test split
# weights (tensors of two or more dimensions) are stored in float16; BatchNorm statistics and biases stay float32
_STUDY_OPS = tuple(OPS)  # the study net is shipped with every operator of the zoo


@dataclass(frozen=True)
class Recipe:
    """One shipped model's training: the arguments of :func:`erf_lab.train.train`."""

    arch: str
    op: str
    seed: int
    epochs: int
    data: str = "digits-ms"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None  # None: the trainer's default
    offset_lr_mult: Optional[float] = None  # None: the trainer's default ("auto")

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.op}-s{self.seed}"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch_kwargs"] = dict(self.arch_kwargs)
        for key in ("lr", "offset_lr_mult"):
            if d[key] is None:
                del d[key]
        return d

    def command(self, out: Optional[str] = None) -> str:
        """The ``erf-lab train`` command line that trains the same model."""
        words = ["erf-lab", "train", "--arch", self.arch, "--op", self.op, "--data", self.data,
                 "--epochs", str(self.epochs), "--seed", str(self.seed)]
        if "width_mult" in self.arch_kwargs:
            words += ["--width-mult", str(self.arch_kwargs["width_mult"])]
        if "offset_clip" in self.arch_kwargs:
            words += ["--offset-clip", str(self.arch_kwargs["offset_clip"])]
        if self.lr is not None:
            words += ["--lr", str(self.lr)]
        if self.offset_lr_mult is not None:
            words += ["--offset-lr-mult", str(self.offset_lr_mult)]
        return shlex.join(words + ["--out", out or f"{self.name}.pt"])


def op_kwargs(arch: str, op: str) -> Dict[str, Any]:
    """Model arguments a recipe adds for ``op`` in ``arch``: DK's MobileNetV2 clips its kernel
    offsets to the scope (see :func:`op_train_kwargs`)."""
    return {"offset_clip": "scope"} if arch == "mobilenet_v2" and op == "dk" else {}


def op_train_kwargs(arch: str, op: str) -> Dict[str, Any]:
    """Training arguments a recipe adds for ``op`` in ``arch``. DK's MobileNetV2 learns its kernel
    offsets at 0.01x the rate: at the default 0.1x (unclipped) they left the 4x4 scope, mean 2-5
    cells by epoch 6, the sampled kernels vanished and the network output a constant (loss ln 10);
    clipped to the scope it stayed at chance for 10 epochs, while with the offsets frozen it left
    chance by epoch 3 like the rigid MobileNetV2 (docs/experiments.md)."""
    return {"offset_lr_mult": 0.01} if arch == "mobilenet_v2" and op == "dk" else {}


def _recipes() -> Tuple[Recipe, ...]:
    # seed 0 of everything first, so a partial run already covers every figure
    out: List[Recipe] = []
    for seed in (0, 1, 2):
        out += [Recipe("study_net", op, seed, 50) for op in _STUDY_OPS]
        if seed < 2:
            out += [Recipe("mobilenet_v2", op, seed, 40,
                           arch_kwargs={"width_mult": 0.5, **op_kwargs("mobilenet_v2", op)},
                           **op_train_kwargs("mobilenet_v2", op))
                    for op in ("conv", "condconv", "dk")]
    return tuple(out)


RECIPES: Tuple[Recipe, ...] = _recipes()


def available(folder: Union[str, Path, None] = None) -> List[Path]:
    """The shipped checkpoint files, sorted by name."""
    return sorted(Path(folder or SHIPPED_DIR).glob("*.pt"))


def is_spec(spec: Union[str, Path]) -> bool:
    return isinstance(spec, str) and spec.startswith(SPEC_PREFIX)


def resolve(spec: str) -> Path:
    """The file of a ``study:NAME`` spec (module docstring); ErfLabError naming the choices if absent."""
    name = spec[len(SPEC_PREFIX):] if is_spec(spec) else spec
    parts = name.split("-")
    if parts and parts[0] in _STUDY_OPS:
        parts = ["study_net"] + parts
    if not (parts and parts[-1][:1] == "s" and parts[-1][1:].isdigit()):
        parts.append("s0")
    path = SHIPPED_DIR / ("-".join(parts) + ".pt")
    if not path.is_file():
        names = ", ".join(p.stem for p in available()) or "none (run scripts/train_study_models.py)"
        raise ErfLabError(f"no shipped study model {name!r}; shipped: {names}")
    return path


def _load(path: Path) -> Dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def study_info(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The ``study`` entry of a shipped checkpoint (None for other files)."""
    try:
        ckpt = _load(Path(path))
    except Exception:  # noqa: BLE001 - not a checkpoint: no study entry
        return None
    return ckpt.get("study") if isinstance(ckpt, dict) else None


def shipped_recipe(path: Path) -> Optional[Dict[str, Any]]:
    """The recipe recorded in ``path`` (None when it is absent or not a shipped model)."""
    if not path.is_file():
        return None
    info = study_info(path)
    return None if info is None else info.get("recipe")
