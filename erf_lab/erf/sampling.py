"""Which images an ERF is computed on, and how they reach the device: the image source (a tensor,
a Dataset or a data spec), the seeded selection, this process's shard of it under
torch.distributed, and the loader that stacks, resizes and crops batches."""
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..errors import ErfLabError
from .options import Settings

__all__ = ["ImageSource", "select_images", "open_source", "Sampling", "Loader"]


def open_source(data: Any, settings: Settings, channels: Optional[int]) -> "ImageSource":
    """``data`` as an :class:`ImageSource`; a data spec string (``"digits-ms"``, ``"noise"``, a
    folder...) opens its test split (:func:`erf_lab.data.open_data`)."""
    if isinstance(data, (str, Path)):
        from ..data import open_data

        n = settings.num_images
        data = open_data(str(data), split="test", seed=settings.seed, image_size=settings.image_size,
                         channels=channels or 3, **({"num_images": n} if str(data) == "noise" and n else {}))
    return ImageSource(data)


class ImageSource:
    """Indexable images from a tensor, a Dataset of dicts / tensors / (image, label) tuples."""

    def __init__(self, data: Any) -> None:
        self.data = data
        if isinstance(data, Tensor):
            if data.dim() == 3:
                self.data = data.unsqueeze(0)
            elif data.dim() != 4:
                raise ErfLabError(f"an image tensor must be (C,H,W) or (N,C,H,W), got shape {list(data.shape)}")
        elif not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise ErfLabError(f"data must be an image tensor (N,C,H,W), a Dataset of images or a data spec "
                              f"string such as 'digits-ms' or 'noise', got {type(data).__name__}")

    def __len__(self) -> int:
        return len(self.data)

    def image(self, i: int) -> Tensor:
        item = self.data[i]
        if isinstance(item, dict):
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor):
            item = torch.as_tensor(np.asarray(item))
        if item.dim() != 3:
            raise ErfLabError(f"item {i} is not an image tensor (C,H,W): shape {list(item.shape)}")
        return item

    def labels(self) -> np.ndarray:
        if hasattr(self.data, "labels"):
            return np.asarray(self.data.labels)
        out = []
        for i in range(len(self)):
            item = self.data[i]
            out.append(item["label"] if isinstance(item, dict) else item[1] if isinstance(item, (tuple, list)) else -1)
        return np.asarray([int(v) for v in out])


def select_images(source: ImageSource, num_images: Optional[int], sampling: str, seed: int) -> List[int]:
    n = len(source)
    if n == 0:
        raise ErfLabError("the data set is empty")
    k = n if num_images is None else min(int(num_images), n)
    g = torch.Generator().manual_seed(int(seed))
    if sampling == "random":
        return torch.randperm(n, generator=g)[:k].tolist()
    if sampling == "stratified":
        labels = source.labels()
        classes = sorted(set(labels.tolist()))
        queues = {c: [i for i in torch.randperm(n, generator=g).tolist() if labels[i] == c] for c in classes}
        out: List[int] = []
        while len(out) < k:
            for c in classes:
                if queues[c] and len(out) < k:
                    out.append(queues[c].pop(0))
        return out
    if sampling == "first":
        return list(range(k))
    raise ErfLabError(f"sampling must be 'random' or 'stratified', got {sampling!r}")


class Sampling:
    """The selected image indices (every process's) and this process's shard of them."""

    def __init__(self, source: ImageSource, settings: Settings) -> None:
        self.indices = select_images(source, settings.num_images, settings.sampling, settings.seed)
        self.sharded = distributed.is_active() if settings.distributed is None else bool(
            settings.distributed and distributed.is_active())
        self.mine: List[int] = list(distributed.shard(self.indices)) if self.sharded else list(self.indices)

    @property
    def world_size(self) -> int:
        return distributed.rank_world()[1] if self.sharded else 1


class Loader:
    """Stacks images of the source on the device in the model's dtype, resized to ``size``
    (bicubic) when given; all images must share one size otherwise."""

    def __init__(self, source: ImageSource, size: Optional[Tuple[int, int]], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.source, self.size, self.dtype, self.device = source, size, dtype, device
        self._first: Optional[Tuple[int, ...]] = None

    def __call__(self, ids: Sequence[int], window: Optional[Tuple[int, int, int, int]] = None) -> Tensor:
        """The images ``ids`` stacked (N, C, H, W); only ``window`` (y0, x0, y1, x1) of each when given."""
        imgs = [self.source.image(i).to(self.dtype) for i in ids]
        shapes = {tuple(t.shape) for t in imgs} | ({self._first} if self._first else set())
        if self.size is None and len(shapes) > 1:
            raise ErfLabError(f"images differ in size {sorted(shapes)}; pass image_size to resize them")
        if self._first is None:
            self._first = tuple(imgs[0].shape)
        imgs = [t if self.size is None or tuple(t.shape[-2:]) == self.size else
                F.interpolate(t[None], size=self.size, mode="bicubic", align_corners=False)[0] for t in imgs]
        if window is not None:
            imgs = [t[:, window[0] : window[2], window[1] : window[3]] for t in imgs]
        return torch.stack(imgs).to(self.device)
