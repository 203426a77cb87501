"""Small argument helpers shared by the operators and modules."""
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    """Normalise an int or a 2-sequence of ints to a pair, like ``nn.modules.utils._pair``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one axis (``torch.nn.functional.conv2d`` rule)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def memory_format_of(t: Optional[torch.Tensor]) -> torch.memory_format:
    """The memory format the kernels give an output of argument ``t`` (impl.h's ``format_of``):
    channels-last when ``t`` is channels-last and not also contiguous, as conv2d does."""
    cl = t is not None and t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format
