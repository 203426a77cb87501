"""Image folders: one sub-folder per class (labelled) or a flat folder of images (unlabelled).

A folder holding ``train/``, ``val/`` or ``test/`` sub-folders provides those splits (class
names are the union over the splits, so labels agree between them; ``all`` is their union).
Any other folder is one set returned for every split: point ``--data`` at the split you
want. Class sub-folders are searched recursively; in a labelled folder, loose images next to
the class folders are ignored (with a warning). Boxes are the whole image and size bins are
unknown (-1). Images are resized to ``image_size`` (aspect not kept) and normalised with the
ImageNet mean and std.
"""
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import ErfLabError
from ._image import filter_readable, is_image_file, load_image, to_tensor
from .base import IMAGENET_MEAN, IMAGENET_STD, SampleDataset, channel_stats, subset_indices

SPLIT_DIRS = ("train", "val", "test")


def _images_in(folder: str, recursive: bool) -> List[str]:
    if not recursive:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if is_image_file(f) and os.path.isfile(os.path.join(folder, f)))
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return out


def scan_folder(folder: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """``({class name: image paths}, loose images)`` of one set folder."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise ErfLabError(f"{folder}: cannot list the folder ({exc.strerror})") from None
    classes = {}
    for name in entries:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not name.startswith("."):
            images = _images_in(path, recursive=True)
            if images:
                classes[name] = images
    return classes, _images_in(folder, recursive=False)


class ImageFolderData(SampleDataset):
    """An image folder (see the module docstring); items as :class:`SampleDataset`.

    Extra attribute: ``paths`` (the image file of each item).
    """

    def __init__(self, root: str, split: str, image_size: Tuple[int, int], channels: int,
                 num_images: Optional[int], seed: int, skip_bad: bool) -> None:
        spec, root = root, os.path.normpath(root)
        split_dirs = [d for d in SPLIT_DIRS if os.path.isdir(os.path.join(root, d))]
        if split_dirs:
            if split == "all":
                sets = split_dirs
            elif split in split_dirs:
                sets = [split]
            else:
                raise ErfLabError(
                    f"{root}: has split sub-folders ({', '.join(split_dirs)}) but no {split!r} sub-folder; "
                    f"choose one of them or point data (--data) at a class folder"
                )
            scans = {s: scan_folder(os.path.join(root, s)) for s in split_dirs}
        else:
            sets = [""]
            scans = {"": scan_folder(root)}
        labelled = [s for s, (classes, _) in scans.items() if classes]
        class_names = sorted({c for s in labelled for c in scans[s][0]})
        paths: List[str] = []
        labels: List[int] = []
        for s in sets:
            classes, loose = scans[s]
            where = os.path.join(root, s) if s else root
            if class_names:
                if loose:
                    warnings.warn(f"erf-lab: {where}: ignoring {len(loose)} image(s) outside the class sub-folders")
                for c, files in classes.items():
                    paths.extend(files)
                    labels.extend([class_names.index(c)] * len(files))
            else:
                paths.extend(loose)
                labels.extend([-1] * len(loose))
        if not paths:
            where = os.path.join(root, sets[0]) if sets[0] else root
            raise ErfLabError(
                f"{where}: no images found (expected class sub-folders of images, or images directly in it; "
                f"extensions: .jpg .png .bmp .tif .webp ...)"
            )
        keep = subset_indices(len(paths), num_images, seed)
        keep = keep[filter_readable([paths[i] for i in keep], skip_bad, root)]
        self._paths = paths
        self.root = root
        mean, std = channel_stats(channels, IMAGENET_MEAN, IMAGENET_STD)
        self._setup(
            spec=spec, split=split, class_names=class_names, labels=np.asarray(labels), sizes=None, size_bins=None,
            image_size=image_size, channels=channels, mean=mean, std=std, num_images=None, seed=seed, indices=keep,
        )
        self.paths = [paths[i] for i in keep]
        self.has_splits = bool(split_dirs)

    def _load(self, j: int) -> Tuple[Tensor, Tensor]:
        image = to_tensor(load_image(self._paths[j], self.channels), self.image_size)
        h, w = self.image_size
        return image, torch.tensor([0.0, 0.0, float(w), float(h)])
