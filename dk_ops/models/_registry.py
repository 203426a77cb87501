"""Model registry: find architectures by name (timm's ``create_model`` habit)."""
import fnmatch
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}
_TRAIN_HINTS: Dict[str, Dict[str, bool]] = {}

# What an architecture asks of the trainer where its settings say "auto" (erf_lab.train):
# progressive_resize -- train on downscaled images early in the run (the study nets);
# size_curriculum -- start with large objects on data that renders per epoch (MobileNetV2).
TRAIN_HINTS = ("progressive_resize", "size_curriculum")


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *,
                   train_hints: Optional[Mapping[str, bool]] = None) -> Any:
    """Decorator: register a model constructor under its function name, with the
    :data:`TRAIN_HINTS` it declares (as timm's ``default_cfgs`` declare a model's defaults).
    ``@register_model`` and ``@register_model(train_hints={...})`` both work."""
    hints = dict(train_hints or {})
    unknown = sorted(set(hints) - set(TRAIN_HINTS))
    if unknown:
        raise ValueError(f"unknown train hint(s) {unknown}; known: {', '.join(TRAIN_HINTS)}")

    def register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = f
        _TRAIN_HINTS[name] = {h: bool(hints.get(h, False)) for h in TRAIN_HINTS}
        return f

    return register(fn) if fn is not None else register


def train_hints(name: str) -> Dict[str, bool]:
    """The :data:`TRAIN_HINTS` registered for ``name`` (all False for an unknown name)."""
    return dict(_TRAIN_HINTS.get(name, dict.fromkeys(TRAIN_HINTS, False)))


def names(pattern: Optional[str] = None) -> List[str]:
    """Registered model names, sorted, optionally filtered by a shell-style ``pattern``."""
    out = sorted(_MODELS)
    return [n for n in out if fnmatch.fnmatch(n, pattern)] if pattern else out


def create(name: str, op: str = "conv", num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build a zoo model by name with the chosen operator on its depthwise 3x3 layers.

    The returned model records how it was built in ``model.arch_name`` and
    ``model.arch_kwargs`` so that ``create(model.arch_name, **model.arch_kwargs)``
    rebuilds the same architecture (the checkpoint format relies on this).
    """
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name}*")
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    model = _MODELS[name](op=op, num_classes=num_classes, **kwargs)
    model.arch_name = name
    model.arch_kwargs = dict(op=op, num_classes=num_classes, **kwargs)
    return model
