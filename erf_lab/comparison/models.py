"""Which models a comparison runs: checkpoint files, globs of epoch checkpoints sorted by the
epoch each file records (a training trajectory), and ``untrained:SPEC`` -- the architecture of
a checkpoint with fresh, seeded weights. Every model is loaded once, before any ERF is computed."""
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn

from ..checkpoint import LoadedModel, build_arch, load_model
from ..errors import ErfLabError

__all__ = ["ModelEntry", "resolve_models", "UNTRAINED", "is_glob"]

UNTRAINED = "untrained:"


@dataclass
class ModelEntry:
    """One row of a comparison: its display ``name``, the ``spec`` it came from, the loaded model,
    and the training epoch its file records (0 for ``untrained:``; None when the file says none)."""

    name: str
    spec: str
    loaded: LoadedModel
    epoch: Optional[int] = None
    untrained: bool = False

    def describe(self) -> dict:
        lm = self.loaded
        return {"name": self.name, "spec": self.spec, "path": lm.path, "kind": lm.kind, "arch": lm.meta.get("arch"),
                "epoch": self.epoch, "untrained": self.untrained}


def is_glob(spec: str) -> bool:
    """Whether ``spec`` is a pattern (``*``, ``?`` or ``[``) rather than a file that exists."""
    return any(c in spec for c in "*?[") and not Path(spec).exists()


def _epoch(lm: LoadedModel) -> Optional[int]:
    e = lm.meta.get("epoch")
    return int(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else None


def _untrained(spec: str, arch: Optional[str], trust: bool, seed: int) -> LoadedModel:
    base = load_model(spec, arch=arch, trust=trust)
    name = base.meta.get("arch")
    if not isinstance(name, str):
        raise ErfLabError(f"{UNTRAINED}{spec}: the file does not name its architecture (a {base.kind}); "
                          "untrained: needs an erf-lab checkpoint, or a state_dict with arch (--arch)")
    torch.manual_seed(seed)
    model = build_arch(name, base.meta.get("arch_kwargs") or {}).eval()
    meta = {k: v for k, v in base.meta.items() if k not in ("metrics", "epoch")}
    return LoadedModel(model, dict(meta, untrained=True), base.kind, base.path)


def _expand(spec: str) -> List[str]:
    if not is_glob(spec):
        return [spec]
    files = sorted(p for p in glob.glob(spec) if Path(p).is_file())
    if not files:
        raise ErfLabError(f"no file matches {spec!r} (--model)")
    return files


def resolve_models(specs: Sequence[Any], names: Optional[Sequence[str]] = None, *, arch: Optional[str] = None,
                   trust: bool = False, seed: int = 0) -> List[ModelEntry]:
    """Loads every model of ``specs`` (files, globs, ``untrained:SPEC``, ``study:NAME``; also
    ``nn.Module`` and :class:`~erf_lab.LoadedModel` objects, used as they are), in order;
    a glob's files come sorted by the epoch each records. ``names``: one display name per spec
    (a glob's files get ``NAME epoch E``); default the file stem, ``untrained`` added.

    Raises:
        ErfLabError: a missing or unreadable file, a glob without match, a globbed file without
            an epoch, a name count that does not match.
    """
    specs = list(specs)
    if not specs:
        raise ErfLabError("give at least one model (models, --model PATH)")
    if names is not None and len(names) != len(specs):
        raise ErfLabError(f"{len(names)} names (--name) for {len(specs)} models (--model): give one name per model")
    entries: List[ModelEntry] = []
    for k, spec in enumerate(specs):
        if isinstance(spec, (nn.Module, LoadedModel)):
            lm = spec if isinstance(spec, LoadedModel) else LoadedModel(spec.eval(), {}, "module", "")
            name = names[k] if names is not None else (Path(lm.path).stem if lm.path else f"model {k + 1}")
            entries.append(ModelEntry(name, lm.path or type(lm.model).__name__, lm, _epoch(lm)))
            continue
        if not isinstance(spec, (str, Path)):
            raise ErfLabError(f"a model must be a file, a glob, untrained:SPEC or an nn.Module, got "
                              f"{type(spec).__name__} (models, --model)")
        spec = str(spec)
        untrained = spec.startswith(UNTRAINED)
        base = spec[len(UNTRAINED):] if untrained else spec
        files = _expand(base)
        loaded = [(f, _untrained(f, arch, trust, seed) if untrained else load_model(f, arch=arch, trust=trust))
                  for f in files]
        if len(files) > 1 or is_glob(base):
            missing = [f for f, lm in loaded if _epoch(lm) is None]
            if missing:
                raise ErfLabError(f"{missing[0]} (matched by {base!r}) records no epoch: a glob of models must be "
                                  "epoch checkpoints (erf-lab train --keep-every)")
            loaded.sort(key=lambda t: _epoch(t[1]))
        for f, lm in loaded:
            epoch = 0 if untrained else _epoch(lm)
            stem = names[k] if names is not None else Path(f.split(":", 1)[1] if f.startswith("study:") else f).stem
            if len(loaded) > 1 or (is_glob(base) and names is None):
                stem = f"{names[k]} epoch {epoch}" if names is not None else f"epoch {epoch}"
            name = f"{stem} (untrained)" if untrained and names is None else stem
            entries.append(ModelEntry(name, spec, lm, epoch, untrained))
    seen: dict = {}
    for e in entries:  # two copies of one file stay two rows
        seen[e.name] = seen.get(e.name, 0) + 1
        if seen[e.name] > 1:
            e.name = f"{e.name} ({seen[e.name]})"
    return entries
