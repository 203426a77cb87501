"""Safe model loading: ``load_model(path, arch=None, trust=False) -> LoadedModel``.

Accepted files:

* TorchScript archives (``torch.jit.save``) and ``torch.export`` programs (``.pt2``);
* erf-lab checkpoints written by ``erf-lab train``: dicts with ``arch``, ``arch_kwargs``,
  ``state_dict`` and metadata (input size, normalisation, data spec, class names...);
* plain state_dicts (optionally under a ``state_dict``/``model`` key), given ``arch``: a zoo
  name (``dk_ops.models.names()``), ``torchvision:NAME`` or ``timm:NAME``;
* a pickled whole ``nn.Module``, only with ``trust=True``.

Everything is read with ``torch.load(weights_only=True)`` first: that unpickler refuses any
global outside torch's allowlist *before* calling it, so code inside a refused file never
runs. Every failure is an :class:`~erf_lab.errors.ErfLabError` with one line that says what is
wrong (missing/unexpected keys are listed).
"""
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .errors import ErfLabError

__all__ = ["LoadedModel", "load_model", "build_arch", "infer_input_channels"]

TRUST_HELP = (
    "--trust-checkpoint (trust=True) unpickles it fully, which runs any Python code stored in the file: "
    "use it only for files from a source you trust, or re-save the weights as a state_dict"
)


@dataclass
class LoadedModel:
    """A model in eval mode plus what its file says about it.

    Attributes:
        model: the ``nn.Module`` (a ``ScriptModule`` or an exported program's module for those formats).
        meta: checkpoint metadata (``arch``, ``arch_kwargs``, ``input_size`` [C, H, W],
            ``normalization`` {mean, std}, ``data_spec``, ``class_names``, ...); empty for bare files.
        kind: ``"torchscript"``, ``"export"``, ``"checkpoint"``, ``"state_dict"`` or ``"pickle"``.
        path: the file.
    """

    model: nn.Module
    meta: Dict[str, Any] = field(default_factory=dict)
    kind: str = "checkpoint"
    path: str = ""

    @property
    def input_size(self) -> Optional[Tuple[int, int, int]]:
        s = self.meta.get("input_size")
        return tuple(int(v) for v in s) if s else None

    @property
    def in_channels(self) -> int:
        s = self.input_size
        return s[0] if s else infer_input_channels(self.model)


def infer_input_channels(model: nn.Module) -> int:
    """Input channel count: the first conv-like module's ``in_channels``, else the first 4-D weight's."""
    for m in model.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int):
            return c
    for _, p in model.named_parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return 3


def _short(names: List[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def build_arch(arch: str, arch_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """An untrained model by name: ``torchvision:NAME``, ``timm:NAME`` or a zoo name."""
    kw = dict(arch_kwargs or {})
    if arch.startswith("torchvision:"):
        name = arch.split(":", 1)[1]
        try:
            import torchvision
        except Exception as exc:  # noqa: BLE001 - a broken install is as good as a missing one
            raise ErfLabError(
                f"--arch {arch} needs torchvision, which is not importable here ({type(exc).__name__}); "
                "install the torchvision build that matches your torch"
            ) from exc
        try:
            return torchvision.models.get_model(name, weights=None, **kw)
        except (ValueError, KeyError, TypeError) as exc:
            raise ErfLabError(f"torchvision has no model {name!r}: {exc}") from exc
    if arch.startswith("timm:"):
        name = arch.split(":", 1)[1]
        try:
            import timm
        except Exception as exc:  # noqa: BLE001
            raise ErfLabError(
                f"--arch {arch} needs timm, which is not importable here ({type(exc).__name__}); pip install timm"
            ) from exc
        try:
            return timm.create_model(name, pretrained=False, **kw)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ErfLabError(f"timm cannot build {name!r}: {exc}".splitlines()[0]) from exc
    from dk_ops import models

    if arch not in models.names():
        raise ErfLabError(f"unknown arch {arch!r}: give a zoo model ({', '.join(models.names())}), "
                          "torchvision:NAME or timm:NAME")
    try:
        return models.create(arch, **kw)
    except (ValueError, TypeError) as exc:
        raise ErfLabError(f"cannot build arch {arch!r}: {exc}") from exc


def _load_state(model: nn.Module, state: Mapping[str, Any], where: str) -> None:
    if not all(isinstance(k, str) for k in state) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ErfLabError(f"{where}: the state_dict holds non-tensor entries; is this a state_dict?")
    own = model.state_dict()
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise ErfLabError(f"{where}: the weights do not fit the architecture ({'; '.join(parts)})")
    bad = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ErfLabError(f"{where}: shape mismatch (file vs model): {_short(bad, 4)}")
    model.load_state_dict(state, strict=True)


def _zip_names(path: Path) -> List[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def load_model(
    path: Union[str, Path],
    arch: Optional[str] = None,
    trust: bool = False,
    arch_kwargs: Optional[Mapping[str, Any]] = None,
    map_location: Union[str, torch.device] = "cpu",
) -> LoadedModel:
    """Loads a model file safely (module docstring lists the formats).

    Args:
        path: the file.
        arch: architecture for a plain state_dict (overrides a checkpoint's own ``arch``).
        trust: allow full unpickling (runs code from the file; see ``--trust-checkpoint``).
        arch_kwargs: keyword arguments for ``arch``.
        map_location: where tensors are loaded.

    Returns:
        a :class:`LoadedModel` whose model is in eval mode.

    Raises:
        ErfLabError: missing, corrupt or truncated files, refused pickles, unknown archs,
            missing/unexpected keys, shape mismatches.
    """
    p = Path(path)
    if p.is_dir():
        raise ErfLabError(f"{p} is a folder, not a model file (give the checkpoint file inside it)")
    if not p.is_file():
        raise ErfLabError(f"no such model file: {p}")
    names = _zip_names(p)
    where = str(p)
    tops = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tops and any(t.startswith("code/") for t in tops):
        try:
            m = torch.jit.load(str(p), map_location=map_location)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
            raise ErfLabError(f"{where}: corrupt TorchScript archive ({type(exc).__name__})") from exc
        return LoadedModel(m.eval(), {}, "torchscript", where)
    if "archive_format" in tops or "models/model.json" in tops:
        try:
            ep = torch.export.load(str(p))
        except Exception as exc:  # noqa: BLE001
            raise ErfLabError(f"{where}: cannot read the torch.export program ({type(exc).__name__})") from exc
        return LoadedModel(ep.module(), {}, "export", where)
    try:
        # TorchVersion (what torch.__version__ is) is a plain str subclass: harmless to allow.
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            obj = torch.load(str(p), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _refused_global(exc):  # garbage opcodes, not a refused class
            raise ErfLabError(f"{where}: not a readable PyTorch file, corrupt or truncated (bad pickle data)") from exc
        if not trust:
            raise ErfLabError(f"{where} holds pickled Python objects that a safe load refuses: it needs full unpickling; {TRUST_HELP}") from exc
        try:
            obj = torch.load(str(p), map_location=map_location, weights_only=False)
        except Exception as exc2:  # noqa: BLE001
            raise ErfLabError(f"{where}: cannot unpickle ({type(exc2).__name__}: {exc2})".splitlines()[0]) from exc2
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError, IndexError) as exc:
        raise ErfLabError(f"{where}: not a readable PyTorch file, corrupt or truncated ({type(exc).__name__})") from exc
    return _from_object(obj, arch, arch_kwargs, where)


def _refused_global(exc: BaseException) -> bool:
    """Whether a ``weights_only`` failure is a refused global (the file is readable but needs full
    unpickling) rather than bad data: torch words it "Unsupported global: GLOBAL x.y", "unsupported
    GLOBAL x.y whose module x is blocked", "Unsupported operand ..." for REDUCE/BUILD on such objects."""
    text = str(exc).lower()
    return "unsupported global" in text or "whose module" in text or "is not an allowed global" in text


def _from_object(obj: Any, arch: Optional[str], arch_kwargs, where: str) -> LoadedModel:
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), {}, "pickle", where)
    if not isinstance(obj, Mapping):
        raise ErfLabError(f"{where} holds a {type(obj).__name__}, not a model, checkpoint or state_dict")
    if "state_dict" in obj and ("arch" in obj or obj.get("format") == "erf-lab-checkpoint"):
        meta = {k: v for k, v in obj.items() if k != "state_dict" and "optimizer" not in k and "scheduler" not in k}
        name = arch or obj.get("arch")
        if not isinstance(name, str):
            raise ErfLabError(f"{where}: checkpoint has no 'arch'; pass --arch NAME")
        kw = dict(arch_kwargs) if arch_kwargs is not None else dict(obj.get("arch_kwargs") or {})
        model = build_arch(name, kw)
        _load_state(model, obj["state_dict"], where)
        meta.setdefault("arch", name)
        return LoadedModel(model.eval(), meta, "checkpoint", where)
    state = obj
    for key in ("state_dict", "model", "model_state", "model_state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            state = obj[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ErfLabError(f"{where}: a dict that is neither an erf-lab checkpoint nor a state_dict (keys: {_short([str(k) for k in obj])})")
    if arch is None:
        raise ErfLabError(f"{where} is a plain state_dict: pass --arch NAME (a zoo name, torchvision:NAME or timm:NAME)")
    model = build_arch(arch, arch_kwargs)
    _load_state(model, state, where)
    return LoadedModel(model.eval(), {"arch": arch, "arch_kwargs": dict(arch_kwargs or {})}, "state_dict", where)
