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
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .errors import ErfLabError

CHECKPOINT_FORMAT = "erf-lab-checkpoint"  # the "format" of the checkpoints erf_lab.train writes
CHECKPOINT_VERSION = 1

__all__ = ["LoadedModel", "load_model", "build_arch", "infer_input_channels", "ExportedModule"]

TRUST_HELP = (
    "--trust-checkpoint (trust=True) unpickles it fully, which runs any Python code stored in the file: "
    "use it only for files from a source you trust, or re-save the weights as a state_dict"
)


@dataclass
class LoadedModel:
    """A model in eval mode plus what its file says about it.

    Attributes:
        model: the ``nn.Module`` (a ``ScriptModule``, or an :class:`ExportedModule` for a ``torch.export`` program).
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
                f"arch {arch!r} (--arch) needs torchvision, which is not importable here ({type(exc).__name__}); "
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
                f"arch {arch!r} (--arch) needs timm, which is not importable here ({type(exc).__name__}); pip install timm"
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
        path: the file, or ``study:NAME`` for a shipped study model (:mod:`erf_lab.study_models`).
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
    from . import study_models

    p = study_models.resolve(path) if study_models.is_spec(path) else Path(path)
    if p.is_dir():
        raise ErfLabError(f"{p} is a folder, not a model file (give the checkpoint file inside it)")
    if not p.is_file():
        raise ErfLabError(f"no such model file: {p}")
    names = _zip_names(p)
    where = str(p)
    tops = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tops and any(t.startswith("code/") for t in tops):
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript on every load
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
                m = torch.jit.load(str(p), map_location=map_location)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
            raise ErfLabError(f"{where}: corrupt TorchScript archive ({type(exc).__name__})") from exc
        return LoadedModel(m.eval(), {}, "torchscript", where)
    if "archive_format" in tops or "models/model.json" in tops:
        return _load_export(p, names, where, map_location)
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
    if "state_dict" in obj and ("arch" in obj or obj.get("format") == CHECKPOINT_FORMAT):
        meta = {k: v for k, v in obj.items() if k != "state_dict" and "optimizer" not in k and "scheduler" not in k}
        name = arch or obj.get("arch")
        if not isinstance(name, str):
            raise ErfLabError(f"{where}: checkpoint has no 'arch'; pass arch (--arch NAME)")
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
        raise ErfLabError(f"{where} is a plain state_dict: pass arch (--arch NAME: a zoo name, torchvision:NAME or timm:NAME)")
    model = build_arch(arch, arch_kwargs)
    _load_state(model, state, where)
    return LoadedModel(model.eval(), {"arch": arch, "arch_kwargs": dict(arch_kwargs or {})}, "state_dict", where)


# ----------------------------------------------------------------------------------------------
# torch.export programs (.pt2)

_OP_TARGET = re.compile(r'"target":\s*"torch\.ops\.(\w+)\.(\w+)\.(\w+)"')
_TRAINING_OPS = {  # op name -> the argument that says "batch statistics" / "dropout active"
    "aten::batch_norm": "training", "aten::native_batch_norm": "training", "aten::_native_batch_norm_legit": "training",
    "aten::_native_batch_norm_legit_functional": "training", "aten::dropout": "train", "aten::dropout_": "train",
    "aten::feature_dropout": "train", "aten::alpha_dropout": "train",
}


def _unregistered_ops(p: Path, names: List[str]) -> List[str]:
    """``torch.ops`` targets named in the program's serialized graphs that do not resolve here."""
    found = set()
    with zipfile.ZipFile(p) as z:
        for n in names:
            if n.endswith(".json") and "/models/" in "/" + n:
                found.update(_OP_TARGET.findall(z.read(n).decode("utf-8", "replace")))
    missing = []
    for ns, op, overload in sorted(found):
        try:
            getattr(getattr(getattr(torch.ops, ns), op), overload)
        except (AttributeError, RuntimeError):
            missing.append(f"{ns}::{op}.{overload}")
    return missing


def _register_program_ops(p: Path, names: List[str], where: str) -> None:
    """Registers the custom ops a program calls before it is deserialized (torch.export.load
    cannot resolve an unregistered op): dk_ops' native kernels, torchvision's ops."""
    missing = _unregistered_ops(p, names)
    if any(m.startswith("dk_ops::") for m in missing):
        from dk_ops import backend

        if not backend.load_native():
            reason = backend.backend_info().get("native", "")
            raise ErfLabError(f"{where}: the program calls the native dk_ops operator, whose kernels are "
                              f"unavailable here ({reason})".splitlines()[0])
    if any(m.startswith("torchvision::") for m in missing):
        try:
            import torchvision  # noqa: F401 - importing registers torchvision's operators
        except Exception:  # noqa: BLE001 - reported below as a missing operator
            pass
    missing = _unregistered_ops(p, names) if missing else []
    if missing:
        raise ErfLabError(f"{where}: the torch.export program calls operators that are not registered here: "
                          f"{_short(missing, 3)}; import the library that defines them before loading")


def _dim_range(vr: Any) -> Optional[Tuple[int, Optional[int]]]:
    """(min, max or None when unbounded) of a ``range_constraints`` entry."""
    if vr is None:
        return None
    try:
        hi = int(vr.upper) if getattr(vr.upper, "is_finite", True) else None
        return int(vr.lower), hi
    except (TypeError, ValueError, AttributeError):
        return None


def _program_inputs(ep: "torch.export.ExportedProgram") -> List[Optional[Tuple[tuple, tuple]]]:
    """Per user input of the program: (shape with None for dynamic sizes, (min, max) range per
    dynamic size), read from the placeholders' ``meta["val"]``; None for a non-tensor input."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out: List[Optional[Tuple[tuple, tuple]]] = []
    for name in ep.graph_signature.user_inputs:
        node = placeholders.get(name)
        val = node.meta.get("val") if node is not None else None
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        dims: List[Optional[int]] = []
        ranges: List[Optional[Tuple[int, Optional[int]]]] = []
        for s in val.shape:
            expr = getattr(getattr(s, "node", None), "expr", None)
            if isinstance(s, int) or getattr(expr, "is_number", False):
                dims.append(int(s) if isinstance(s, int) else int(expr))
                ranges.append(None)
            else:
                dims.append(None)
                ranges.append(_dim_range(ep.range_constraints.get(expr)))
        out.append((tuple(dims), tuple(ranges)))
    return out


def _describe_input(spec: Optional[Tuple[tuple, tuple]]) -> Tuple[str, str]:
    """('[1, 3, 224, 224]', 'batch 1 static') or ('[N, 3, 224, 224]', 'batch N in 1..16')."""
    if spec is None:
        return "(not a tensor)", ""
    dims, ranges = spec
    labels = ("N", "C", "H", "W") if len(dims) == 4 else tuple(f"d{i}" for i in range(len(dims)))
    want = "[" + ", ".join(labels[i] if d is None else str(d) for i, d in enumerate(dims)) + "]"
    parts = []
    for i, (d, r) in enumerate(zip(dims, ranges)):
        if d is None:
            label = "batch N" if i == 0 else labels[i]
            parts.append(f"{label} in {r[0]}..{'' if r[1] is None else r[1]}" if r else f"{label} dynamic")
    if dims and dims[0] is not None:
        parts.insert(0, f"batch {dims[0]} static")
    return want, ", ".join(parts)


class ExportedModule(nn.Module):
    """A ``torch.export`` program as an ordinary ``nn.Module`` with the eager module tree.

    ``torch.export.unflatten`` rebuilds the hierarchy, so ``named_modules()`` has the original
    eager names (``layer4``, ``features.3``, ``blocks.11``; each an ``InterpreterModule`` that runs
    aten ops), forward hooks on them fire (also when a hook raises to end the forward early),
    ``parameters()``/``buffers()``/``state_dict()`` hold the program's tensors under the eager
    names, and ``to(device)`` moves them (tensor constants and device arguments burnt into the
    graphs included; dtype conversions are not rewritten into the graphs).

    Attributes:
        input_shape: shape of the program's first input as exported, e.g. ``(1, 3, 224, 224)``,
            with None for each dimension exported dynamic (``(None, 3, 224, 224)``); None when
            the first input is not a tensor.
        exported_program: the loaded ``torch.export.ExportedProgram``.
        exported_training: True when the graph computes batch statistics or active dropout
            (the model was exported in training mode).

    The train/eval behaviour was fixed at export: ``eval()`` / ``train(False)`` only set the
    ``training`` flags, ``train(True)`` raises :class:`ErfLabError`. A forward with an input the
    program rejects (a batch other than a static one, another image size) raises a one-line
    :class:`ErfLabError` naming the shape it takes.
    """

    def __init__(self, program: "torch.export.ExportedProgram") -> None:
        super().__init__()
        unflat = torch.export.unflatten(program)
        # Share the unflattened module's tree rather than nest it, so the names stay the eager ones;
        # the program itself runs as the unflattened module (its graph fetches from it).
        self.__dict__["_program"] = unflat
        self.__dict__["exported_program"] = program
        self.__dict__["_modules"] = unflat._modules
        self.__dict__["_parameters"] = unflat._parameters
        self.__dict__["_buffers"] = unflat._buffers
        self.__dict__["_non_persistent_buffers_set"] = unflat._non_persistent_buffers_set
        self._inputs = _program_inputs(program)
        first = self._inputs[0] if self._inputs else None
        self.input_shape: Optional[Tuple[Optional[int], ...]] = first[0] if first is not None else None
        self.exported_training = _exported_training(program)
        super().train(False)

    def train(self, mode: bool = True) -> "ExportedModule":
        if mode:
            raise ErfLabError(
                "a torch.export program cannot be put in training mode: its batch-norm and dropout behaviour "
                "was fixed when it was exported; re-export the model in the mode you need"
            )
        return super().train(False)

    def forward(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        prog = self.__dict__["_program"]
        if _fx_tracing():
            # torch.fx (the theoretical RF) traces the graph with one placeholder for the image.
            if len(self._inputs) != 1:
                raise ErfLabError(f"the torch.export program takes {len(self._inputs)} inputs; "
                                  "only one-input programs can be traced")
            return prog.forward(x)
        if x is not None or not kwargs:
            args = (x,) + args
        try:
            prog.process_forward_inputs(*args, **kwargs)  # torch's guards: shapes, ranks, count
        except Exception as exc:  # noqa: BLE001 - any rejection means "wrong inputs"
            raise ErfLabError(self._rejected(args, kwargs)) from exc
        return prog.forward(*args, **kwargs)

    def _rejected(self, args: tuple, kwargs: dict) -> str:
        import torch.utils._pytree as pytree

        got = ", ".join(str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                        for t in pytree.tree_leaves((args, kwargs)))
        described = [_describe_input(s) for s in self._inputs]
        want = ", ".join(w for w, _ in described)
        detail = "; ".join(d for _, d in described if d)
        noun = "inputs of shape" if len(described) == 1 else f"{len(described)} inputs of shapes"
        detail = f" ({detail})" if detail else ""
        return f"this torch.export program takes {noun} {want}{detail}, got {got or 'no input'}"

    def _apply(self, fn: Any, recurse: bool = True) -> "ExportedModule":
        before = _tensor_device(self)
        super()._apply(fn, recurse)
        for m in self.__dict__["_program"].modules():  # lifted tensor constants are plain attributes
            for k, v in list(vars(m).items()):
                if isinstance(v, torch.Tensor):
                    m.__dict__[k] = fn(v)
        after = _tensor_device(self)
        if before is not None and after is not None and before != after:
            _retarget_devices(self.__dict__["_program"], before, after)
        return self


def _fx_tracing() -> bool:
    from torch.fx import _symbolic_trace as st

    return (getattr(st, "is_fx_symbolic_tracing", None) or st.is_fx_tracing)()


def _tensor_device(model: nn.Module) -> Optional[torch.device]:
    t = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return t.device if t is not None else None


def _retarget_devices(unflat: nn.Module, before: torch.device, after: torch.device) -> None:
    """Rewrites the devices burnt into the graphs (``device=`` arguments, ``aten.to.device``), as
    ``torch.export.passes.move_to_device_pass`` does on a program, in every unflattened graph."""
    def moved(d: Any) -> Any:
        return after if d is not None and torch.device(d) == before else d

    for m in unflat.modules():
        graph = getattr(m, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if "device" in node.kwargs:
                node.kwargs = {**node.kwargs, "device": moved(node.kwargs["device"])}
            if node.op == "call_function" and node.target is torch.ops.aten.to.device and len(node.args) > 1:
                node.args = (node.args[0], moved(node.args[1])) + tuple(node.args[2:])
        gm = m.__dict__.get("graph_module")
        if isinstance(gm, torch.fx.GraphModule):
            gm.recompile()


def _exported_training(ep: "torch.export.ExportedProgram") -> bool:
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        arg = _TRAINING_OPS.get(schema.name) if schema is not None else None
        if arg is None:
            continue
        names = [a.name for a in schema.arguments]
        i = names.index(arg)
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg, False)
        if value is True:
            return True
    return False


def _load_export(p: Path, names: List[str], where: str, map_location: Any) -> LoadedModel:
    _register_program_ops(p, names, where)
    import logging

    log = logging.getLogger("torch.export")  # torch logs a traceback per failed node before raising
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        ep = torch.export.load(str(p))
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise ErfLabError(f"{where}: cannot read the torch.export program ({type(exc).__name__})") from exc
    finally:
        log.setLevel(level)
    try:
        model = ExportedModule(ep)
    except ErfLabError:
        raise
    except Exception as exc:  # noqa: BLE001
        msg = f"{where}: cannot rebuild the module tree of the torch.export program ({type(exc).__name__}: {exc})"
        raise ErfLabError(msg.splitlines()[0]) from exc
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    meta: Dict[str, Any] = {}
    shape = model.input_shape
    if shape is not None:
        meta["input_shape"] = list(shape)
        if len(shape) == 4 and all(v is not None for v in shape[1:]):
            meta["input_size"] = [int(v) for v in shape[1:]]
    if model.exported_training:
        meta["exported_training"] = True
        warnings.warn(f"{where}: the program was exported in training mode (batch statistics or active "
                      "dropout are part of its graph); eval() cannot change that", UserWarning, stacklevel=3)
    return LoadedModel(model, meta, "export", where)
