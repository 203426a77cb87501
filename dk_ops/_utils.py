"""Small argument helpers shared by the operators and modules."""
from typing import Sequence, Tuple, Union

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
