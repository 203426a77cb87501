"""Model registry: find architectures by name (timm's ``create_model`` habit)."""
import fnmatch
from typing import Callable, Dict, List, Optional

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


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
