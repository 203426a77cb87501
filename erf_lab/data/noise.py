"""``noise``: standard-normal images, for ERFs that depend on the network only."""
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import SampleDataset

DEFAULT_NUM_IMAGES = 50


class NoiseDataset(SampleDataset):
    """``num_images`` (default 50) images of i.i.d. N(0, 1) pixels, unlabelled.

    Image ``j`` is drawn from a generator seeded with ``(seed, split, j)``, so it does
    not depend on how many images are requested. Images are already standardised:
    ``mean = 0`` and ``std = 1`` per channel, and the box is the whole image.
    """

    _SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "all": 3}

    def __init__(self, spec: str, split: str, image_size: Tuple[int, int], channels: int,
                 num_images: Optional[int], seed: int) -> None:
        n = DEFAULT_NUM_IMAGES if num_images is None else int(num_images)
        self._seed = int(seed)
        self._split_code = self._SPLIT_CODES[split]
        self._setup(
            spec=spec, split=split, class_names=[], labels=np.full(n, -1), sizes=None, size_bins=None,
            image_size=image_size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels,
            num_images=None, seed=seed,
        )

    def _load(self, j: int) -> Tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed((self._seed * 4 + self._split_code) * 1_000_003 + j)
        h, w = self.image_size
        image = torch.randn(self.channels, h, w, generator=g)
        return image, torch.tensor([0.0, 0.0, float(w), float(h)])
