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

__all__ = ["get_layer", "run_to_layer", "select_output", "grid_of", "unit_activation", "LAYOUTS"]

LAYOUTS = ("nchw", "nhwc", "tokens")
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


def grid_of(
    y: Tensor, layout: str, image_hw: Tuple[int, int], prefix_tokens: Optional[int] = None
) -> Tuple[str, Tuple[int, int], int]:
    """(layout, (H', W'), prefix tokens) of a layer output; ``layout="auto"`` means NCHW for 4-D, tokens for 3-D."""
    if layout == "auto":
        layout = {4: "nchw", 3: "tokens"}.get(y.dim(), "")
        if not layout:
            raise ErfLabError(
                f"layer output has shape {list(y.shape)}; the ERF needs a spatial map (N,C,H,W), (N,H,W,C) "
                "or tokens (N,L,C): pick another --layer"
            )
    if layout == "nchw":
        return layout, (int(y.shape[2]), int(y.shape[3])), 0
    if layout == "nhwc":
        return layout, (int(y.shape[1]), int(y.shape[2])), 0
    if layout != "tokens" or y.dim() != 3:
        raise ErfLabError(f"layout {layout!r} does not fit a layer output of shape {list(y.shape)}")
    n_tok = int(y.shape[1])
    h_img, w_img = image_hw
    candidates = [prefix_tokens] if prefix_tokens is not None else range(0, 9)
    for p in candidates:
        n = n_tok - p
        if n <= 0:
            continue
        gh = round((n * h_img / w_img) ** 0.5)
        if gh > 0 and n % gh == 0 and abs(n // gh / gh - w_img / h_img) < 0.5 / gh + 1e-9:
            return layout, (gh, n // gh), p
    raise ErfLabError(
        f"cannot lay {n_tok} tokens on a grid with the image's aspect ratio; give the number of prefix tokens"
    )


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
