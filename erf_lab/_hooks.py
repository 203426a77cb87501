"""Shared layer-capture helpers: find a layer by name, run a model up to it, read a unit.

Used by the ERF engine, its captum backend and ``erf-lab layers``; no method re-implements
hooks of its own.
"""
import difflib
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .errors import ErfLabError

__all__ = ["get_layer", "run_to_layer", "select_output", "unit_activation", "hook_all"]

Index = Union[int, str, None]


class _Stop(Exception):
    """Raised by the capture hook to end the forward once the target layer has run."""


def get_layer(model: nn.Module, name: Optional[str]) -> nn.Module:
    """The module called ``name`` in ``model.named_modules()`` (the model itself for None or "")."""
    if name in (None, ""):
        return model
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `erf-lab layers`"
        raise ErfLabError(f"the model has no layer named {name!r}{hint}")
    return modules[name]


def select_output(out: Any, index: Index = None) -> Tensor:
    """A tensor from a layer output: itself, element ``index`` of a tuple/list, or key ``index`` of a dict."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        i = 0 if index is None else int(index)
        if not -len(out) <= i < len(out):
            raise ErfLabError(f"layer output has {len(out)} elements; --output-index {i} is out of range")
        return select_output(out[i])
    if isinstance(out, dict):
        if index is None:
            index = next(iter(out))
        if index not in out:
            raise ErfLabError(f"layer output has keys {list(out)}; no key {index!r}")
        return select_output(out[index])
    if hasattr(out, "last_hidden_state"):  # HF-style output objects
        return out.last_hidden_state
    raise ErfLabError(f"layer output of type {type(out).__name__} holds no tensor")


@contextmanager
def _capture(layer: nn.Module, stop: bool) -> Iterator[List[Any]]:
    box: List[Any] = []

    def hook(module, inputs, output):
        box.append(output)
        if stop:
            raise _Stop

    try:
        handle = layer.register_forward_hook(hook)
    except (RuntimeError, AttributeError) as exc:  # ScriptModules take no Python hooks
        raise ErfLabError(
            f"cannot hook layer {type(layer).__name__} ({exc}); for TorchScript models only the model output "
            "(no --layer) is supported"
        ) from exc
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def hook_all(model: nn.Module, fn) -> Iterator[bool]:
    """``fn(name, module, output)`` after every named submodule's forward inside the block, the hooks
    removed on exit (also on an error). Yields False when the model takes no Python hooks
    (TorchScript); then nothing is hooked."""
    handles = []
    try:
        for name, m in model.named_modules():
            if not name:
                continue
            try:
                handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, mod, out)))
            except (RuntimeError, AttributeError):  # ScriptModules take no Python hooks
                for h in handles:
                    h.remove()
                handles = []
                yield False
                return
        yield True
    finally:
        for h in handles:
            h.remove()


def run_to_layer(model: nn.Module, x: Tensor, layer: Optional[nn.Module], stop: bool = True) -> Any:
    """Runs ``model(x)`` and returns ``layer``'s output; with ``stop`` the forward ends there."""
    if layer is None or layer is model:
        return model(x)
    with _capture(layer, stop) as box:
        try:
            model(x)
        except _Stop:
            pass
    if not box:
        raise ErfLabError(f"layer {type(layer).__name__} did not run in the model's forward")
    return box[0]


def unit_activation(y: Tensor, layout: str, units: Sequence[Tuple[int, int]], grid_w: int, prefix: int) -> Tensor:
    """Channel vectors at ``units``: y is (B * U, ...) with sample ``b * U + u`` targeting ``units[u]``.

    Returns (B * U, C).
    """
    n_units = len(units)
    b = y.shape[0] // n_units
    uy = torch.tensor([u[0] for u in units], device=y.device).repeat(b)
    ux = torch.tensor([u[1] for u in units], device=y.device).repeat(b)
    rows = torch.arange(y.shape[0], device=y.device)
    if layout == "nchw":
        return y[rows, :, uy, ux]
    if layout == "nhwc":
        return y[rows, uy, ux, :]
    return y[rows, prefix + uy * grid_w + ux, :]
