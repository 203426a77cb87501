"""Batch-norm folding for the ERF engine: an eval-mode BatchNorm2d that only ever sees one
Conv2d's output is an affine map per channel, so it can be folded into that convolution's weight
and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). The engine's forward and backward then skip
every such normalisation; the maps change only by float rounding.

The swap is made in place on the model for the duration of a run and undone afterwards (no copy
of the parameters). Pairs are left alone when folding could change what the run observes: the
target layer is the conv, the BN, or any module whose output is the conv's raw output; a module
carries hooks or parametrisations; a module is called more than once; the BN uses batch statistics.
"""
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["fold_batchnorm"]


def _node(out: Any) -> Optional[fx.Node]:
    return out.node if isinstance(out, fx.Proxy) else out if isinstance(out, fx.Node) else None


def _plain(m: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or parametrize.is_parametrized(m))


def _pairs(graph: Any, layers: Sequence[Optional[str]]) -> List[Tuple[str, str]]:
    """(conv name, bn name) pairs that can be folded without changing anything the run observes
    at any of ``layers``."""
    modules = dict(graph.gm.named_modules())
    protected = set()
    for layer in layers:
        target = graph.module_outputs.get(layer) if layer not in (None, "") else None
        if _node(target) is not None:
            protected.add(_node(target))
    pairs = []
    for node in graph.gm.graph.nodes:
        if node.op != "call_module":
            continue
        bn = modules.get(node.target)
        if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats or bn.running_mean is None:
            continue
        if len(node.all_input_nodes) != 1:
            continue
        src = node.all_input_nodes[0]
        conv = modules.get(src.target) if src.op == "call_module" else None
        if type(conv) is not nn.Conv2d or len(src.users) != 1 or src in protected:
            continue
        if graph.module_calls.get(src.target, 0) != 1 or graph.module_calls.get(node.target, 0) != 1:
            continue
        if src.target in layers or node.target in layers or not (_plain(conv) and _plain(bn)):
            continue
        if conv.weight.dtype != bn.running_mean.dtype or conv.out_channels != bn.num_features:
            continue
        pairs.append((src.target, node.target))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@contextmanager
def fold_batchnorm(model: nn.Module, graph: Any, layer: Union[Optional[str], Sequence[Optional[str]]]) -> Iterator[int]:
    """Within the block, every foldable (Conv2d, eval BatchNorm2d) pair of ``model`` is one
    Conv2d with a bias and an ``nn.Identity``; yields the number of pairs folded. ``layer``: the
    target layer, or a list of them (each protected as the module docstring says)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    swapped = []
    try:
        if graph is not None:
            layers = [layer] if layer is None or isinstance(layer, str) else list(layer)
            for conv_name, bn_name in _pairs(graph, layers):
                conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
                with torch.no_grad():
                    fused = fuse_conv_bn_eval(conv, bn)
                    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
                        fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
                for p in fused.parameters():
                    p.requires_grad_(False)
                swapped.append((conv_name, conv, bn_name, bn))
                _set(model, conv_name, fused)
                _set(model, bn_name, nn.Identity())
        yield len(swapped)
    finally:
        for conv_name, conv, bn_name, bn in reversed(swapped):
            _set(model, conv_name, conv)
            _set(model, bn_name, bn)
