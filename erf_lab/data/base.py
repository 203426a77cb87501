"""The dataset base class shared by every ``--data`` source.

Each item is a dict::

    {"image": FloatTensor[C, H, W],   # normalised with the dataset's mean/std
     "label": int,                    # -1 when unlabelled
     "box": FloatTensor[4],           # [x, y, w, h] in pixels of the returned image
     "size_bin": int,                 # -1 when the object size is unknown
     "index": int}                    # position in the full split (stable under num_images)

so that ``torch.utils.data.default_collate`` batches it directly.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ErfLabError
from .bins import assign_size_bins

Item = Dict[str, object]

#: ImageNet statistics, the normalisation applied to image folders and COCO images
#: (what pretrained torchvision/timm models expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(channels: int, mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel ``(mean, std)`` for ``channels`` from RGB statistics (1 channel: their average)."""
    if channels == len(mean):
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if channels == 1:
        return (float(np.mean(mean)),), (float(np.mean(std)),)
    raise ErfLabError(f"channels={channels} is not supported for this data set (use 1 or {len(mean)})")


def subset_indices(n: int, num_images: Optional[int], seed: int) -> np.ndarray:
    """Indices of the items kept: all ``n``, or a seeded sample of ``num_images`` (sorted)."""
    if num_images is None or num_images >= n:
        return np.arange(n)
    if num_images < 1:
        raise ErfLabError(f"num_images must be >= 1, got {num_images}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=num_images, replace=False))


class SampleDataset(Dataset):
    """A split of a data source with labels, boxes and box-size bins.

    Subclasses fill the attributes below in ``__init__`` and implement
    :meth:`_load` (image in [0, 1] and box for one item of the full split).

    Attributes:
        spec (str): the ``--data`` spec this set was opened from.
        split (str): the split.
        class_names (list[str]): names of the labels ``0..K-1`` (empty when unlabelled).
        size_bin_edges (list[float] | None): ``B + 1`` increasing edges of the box-size bins,
            size being ``sqrt(w * h)`` of the box in the source image's pixels; ``None``
            when sizes are unknown.
        mean, std (tuple[float, ...]): the per-channel normalisation applied to images.
        image_size (tuple[int, int]): ``(H, W)`` of the returned images.
        channels (int): ``C`` of the returned images.
        labels (numpy.ndarray[int64]): label of each item (-1 when unlabelled).
        size_bins (numpy.ndarray[int64]): size bin of each item (-1 when unknown).
        has_splits (bool): whether the source has its own train/val/test splits (a plain
            folder or a COCO file is one set returned for every split).
    """

    has_splits: bool = True

    spec: str
    split: str
    class_names: List[str]
    size_bin_edges: Optional[List[float]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    image_size: Tuple[int, int]
    channels: int

    def _setup(
        self,
        *,
        spec: str,
        split: str,
        class_names: Sequence[str],
        labels: np.ndarray,
        sizes: Optional[np.ndarray],
        size_bins: object,
        image_size: Tuple[int, int],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_images: Optional[int],
        seed: int,
        bin_reference_sizes: Optional[np.ndarray] = None,
        indices: Optional[np.ndarray] = None,
    ) -> None:
        """Record metadata, compute size bins over the full split, then take the subset."""
        self.spec = spec
        self.split = split
        self.class_names = list(class_names)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        n = len(labels)
        if sizes is None or size_bins is None:
            self.size_bin_edges = None
            all_bins = np.full(n, -1, dtype=np.int64)
        else:
            ref = sizes if bin_reference_sizes is None else bin_reference_sizes
            self.size_bin_edges, all_bins = assign_size_bins(sizes, size_bins, reference=ref)
        self._indices = subset_indices(n, num_images, seed) if indices is None else np.asarray(indices, np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self._indices]
        self.size_bins = all_bins[self._indices]
        self.sizes = None if sizes is None else np.asarray(sizes, dtype=np.float64)[self._indices]
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- training hooks (erf_lab.train calls them on every training set) -------------------
    @property
    def renders_on_the_fly(self) -> bool:
        """Whether training items are rendered anew per epoch (:meth:`set_size_floor` needs it)."""
        return False

    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch; a set whose items never change ignores it."""

    def set_size_floor(self, fraction: float) -> None:
        """Restrict the object sizes of items rendered from now on to ``fraction`` x side and more
        (the training's size curriculum); only sets that render on the fly can."""
        raise ErfLabError(f"data {self.spec!r} does not render its items per epoch, so it has no size curriculum")

    def __len__(self) -> int:
        return len(self._indices)

    def _load(self, j: int) -> Tuple[Tensor, Tensor]:
        """Image ``FloatTensor[C, H, W]`` in [0, 1] and box ``[x, y, w, h]`` of item ``j`` of the full split."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> Item:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a data set of {len(self)} items")
        i = i % len(self)
        j = int(self._indices[i])
        image, box = self._load(j)
        image = (image - self._mean_t) / self._std_t
        return {
            "image": image,
            "label": int(self.labels[i]),
            "box": box,
            "size_bin": int(self.size_bins[i]),
            "index": j,
        }

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"{type(self).__name__}(spec={self.spec!r}, split={self.split!r}, n={len(self)}, "
            f"image_size=({self.channels}, {h}, {w}), classes={self.num_classes})"
        )
