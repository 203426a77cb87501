"""The ``--data SPEC`` grammar shared by every command (erf, train, tsne, figures).

``SPEC`` is one of:

* ``noise`` -- standard-normal images (``num_images`` of them, default 50, seeded);
* ``digits-ms`` -- the embedded default: scikit-learn's handwritten digits pasted at many
  scales onto crops of its sample photographs; options as ``digits-ms:64`` (image side) or
  ``digits-ms:size=64,seed=0,renders=8`` (see :mod:`erf_lab.data.digits_ms`);
* ``PATH`` -- an image folder: one sub-folder per class (labelled), or a flat folder of
  images (unlabelled); a folder holding ``train/``, ``val/``, ``test/`` sub-folders provides
  those splits, any other folder is one set returned for every split;
* ``coco:ANNOTATIONS.json:IMAGES_DIR[:OPTIONS]`` -- a COCO instance-annotation file, one
  sample per object; options ``mode=crop`` (default: the object cropped with a context
  margin) or ``mode=full`` (the whole image with the object's box), ``margin=0.5``,
  ``min_size=4``, ``crowd=0``, e.g. ``coco:ann.json:images:mode=full``.
"""
import os
from typing import Optional, Sequence, Tuple, Union

from ..errors import ErfLabError
from .base import SampleDataset
from .bins import SizeBins
from .options import parse_options

SPLITS = ("train", "val", "test", "all")
DEFAULT_SPEC = "digits-ms"

ImageSize = Union[int, Sequence[int], None]


def _image_size(image_size: ImageSize) -> Optional[Tuple[int, int]]:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ErfLabError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw  # type: ignore[return-value]


def open_data(
    spec: str,
    *,
    split: str = "test",
    image_size: ImageSize = None,
    channels: int = 3,
    num_images: Optional[int] = None,
    seed: int = 0,
    skip_bad: bool = False,
    size_bins: SizeBins = "quantile10",
) -> SampleDataset:
    """Open the data set named by ``spec`` (grammar in :mod:`erf_lab.data.spec`).

    Args:
        spec: ``noise``, ``digits-ms[:OPTIONS]``, a folder path, or
            ``coco:ANNOTATIONS.json:IMAGES_DIR[:OPTIONS]``.
        split: ``train``, ``val``, ``test`` or ``all``.
        image_size: side or ``(H, W)`` of the returned images; ``None`` is the source's
            default (64 for ``noise`` and ``digits-ms``, 224 for folders and COCO).
            Folder and COCO images are resized to it without keeping the aspect ratio
            (boxes are scaled with them).
        channels: 3 (RGB) or 1 (grey).
        num_images: keep a seeded random subset of this many items (``noise``: how many to make).
        seed: seed of that subset (and of the noise images); the data set itself is fixed
            by the spec.
        skip_bad: skip undecodable images (counted in a warning) instead of failing.
        size_bins: ``"quantileN"`` (equal-count bins of ``sqrt(w * h)``), ``"coco"``
            (small/medium/large) or explicit edges.

    Returns:
        a :class:`~erf_lab.data.base.SampleDataset` whose items are dicts with ``image``,
        ``label``, ``box``, ``size_bin`` and ``index``.

    Raises:
        ErfLabError: a malformed spec, missing or malformed files (one line: what and where).

    Example::

        >>> ds = open_data("noise", image_size=32, num_images=4)
        >>> ds[0]["image"].shape
        torch.Size([3, 32, 32])
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ErfLabError("data spec is empty: use noise, digits-ms, a folder, or coco:ANNOTATIONS.json:IMAGES_DIR")
    spec = spec.strip()
    if split not in SPLITS:
        raise ErfLabError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if channels not in (1, 3):
        raise ErfLabError(f"channels must be 1 or 3, got {channels}")
    if num_images is not None and int(num_images) < 1:
        raise ErfLabError(f"num_images must be >= 1, got {num_images}")
    hw = _image_size(image_size)
    common = dict(split=split, channels=channels, num_images=num_images, seed=seed)

    name, _, rest = spec.partition(":")
    if name == "noise":
        if rest:
            raise ErfLabError(f"data spec {spec!r}: noise takes no options (use image_size/num_images)")
        from .noise import NoiseDataset

        return NoiseDataset(spec, image_size=hw or (64, 64), **common)
    if name == "digits-ms":
        from .digits_ms import DigitsMS

        return DigitsMS(spec, options=parse_options(rest, spec), image_size=hw, size_bins=size_bins, **common)
    if name == "coco":
        from .coco import CocoObjects

        return CocoObjects(spec, rest, image_size=hw or (224, 224), skip_bad=skip_bad, size_bins=size_bins, **common)
    if os.path.isdir(spec):
        from .folder import ImageFolderData

        return ImageFolderData(spec, image_size=hw or (224, 224), skip_bad=skip_bad, **common)
    if os.path.exists(spec):
        raise ErfLabError(f"data spec {spec!r} is a file, not a folder: use a folder of images or coco:ANNOTATIONS.json:IMAGES_DIR")
    raise ErfLabError(
        f"data spec {spec!r}: no such folder; expected noise, digits-ms[:OPTIONS], a folder of images, "
        "or coco:ANNOTATIONS.json:IMAGES_DIR"
    )
