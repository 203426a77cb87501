"""COCO instance annotations: ``coco:ANNOTATIONS.json:IMAGES_DIR[:OPTIONS]``, one sample per object.

* Category ids (often non-contiguous, e.g. 1..90 with gaps) are mapped to labels
  ``0..K-1`` in increasing id order; ``class_names`` keeps their names and
  ``category_ids`` the original ids.
* Object size is ``sqrt(w * h)`` of the ``bbox`` in the original image's pixels. COCO's
  ``area`` field is the *mask* area and is not used.
* ``mode=crop`` (default): a square crop centred on the object, of side
  ``max(w, h) * (1 + 2 * margin)`` (``margin=0.5``: the object plus half its side of context
  on each side; parts outside the photo are black), resized to ``image_size``.
  ``mode=full``: the whole image resized to ``image_size`` (aspect not kept) with the object's box.
* ``crowd=0`` (default) skips ``iscrowd`` annotations; ``min_size=4`` skips objects with
  ``sqrt(w * h)`` below 4 pixels.
* The file is one set: every split returns it. Images are normalised with the ImageNet
  mean and std.

Malformed files (bad JSON, missing keys, unknown image or category ids, boxes outside their
image, missing image files) raise :class:`~erf_lab.errors.ErfLabError` with one line; with
``skip_bad`` missing or undecodable images are skipped with a count instead.
"""
import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import ErfLabError
from ._image import filter_readable, load_image, to_tensor
from .base import IMAGENET_MEAN, IMAGENET_STD, SampleDataset, channel_stats, subset_indices
from .bins import SizeBins
from .options import parse_options

BOX_TOLERANCE = 1.0  # pixels a box may overhang its image (rounding in real files) before it is an error
_DEFAULTS = {"mode": "crop", "margin": "0.5", "crowd": "0", "min_size": "4"}


def _split_spec(rest: str, spec: str) -> Tuple[str, str, Dict[str, str]]:
    parts = rest.split(":")
    options: Dict[str, str] = {}
    if len(parts) >= 3 and "=" in parts[-1]:
        options = parse_options(parts.pop(), spec)
    if len(parts) != 2 or not all(parts):
        raise ErfLabError(f"data spec {spec!r}: expected coco:ANNOTATIONS.json:IMAGES_DIR[:mode=crop|full,margin=0.5]")
    for key in options:
        if key not in _DEFAULTS:
            raise ErfLabError(f"data spec {spec!r}: unknown option {key!r} (known: {', '.join(_DEFAULTS)})")
    return parts[0], parts[1], {**_DEFAULTS, **options}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def read_coco(path: str) -> Dict[str, object]:
    """Parse and validate a COCO instances file; returns the JSON with checked fields."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ErfLabError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise ErfLabError(f"{path}: is a folder; expected a COCO annotations .json file") from None
    except UnicodeDecodeError:
        raise ErfLabError(f"{path}: not a UTF-8 text file; expected COCO annotations JSON") from None
    except json.JSONDecodeError as exc:
        raise ErfLabError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ErfLabError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ErfLabError(f"{path}: missing or non-list {key!r}; is this a COCO instances file?")
    for kind, required in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name")),
                           ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for k, entry in enumerate(data[kind]):
            missing = [r for r in required if not isinstance(entry, dict) or r not in entry]
            if missing:
                raise ErfLabError(f"{path}: {kind}[{k}] lacks {', '.join(repr(m) for m in missing)}")
    return data


class CocoObjects(SampleDataset):
    """Objects of a COCO annotation file (see the module docstring); items as :class:`SampleDataset`.

    Extra attributes: ``category_ids`` (COCO id of each label), ``annotation_ids`` and
    ``object_boxes`` (each item's bbox in its original image).
    """

    def __init__(self, spec: str, rest: str, split: str, image_size: Tuple[int, int], channels: int,
                 num_images: Optional[int], seed: int, skip_bad: bool, size_bins: SizeBins) -> None:
        ann_path, images_dir, opts = _split_spec(rest, spec)
        self.mode = opts["mode"]
        if self.mode not in ("crop", "full"):
            raise ErfLabError(f"data spec {spec!r}: mode must be crop or full, got {self.mode!r}")
        try:
            self.margin = float(opts["margin"])
            min_size = float(opts["min_size"])
            crowd = bool(int(opts["crowd"]))
        except ValueError:
            raise ErfLabError(f"data spec {spec!r}: margin and min_size must be numbers, crowd 0 or 1") from None
        if self.margin < 0:
            raise ErfLabError(f"data spec {spec!r}: margin must be >= 0, got {self.margin}")
        if not os.path.isdir(images_dir):
            raise ErfLabError(f"{images_dir}: images folder not found (spec {spec!r})")
        data = read_coco(ann_path)

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        label_of = {c["id"]: i for i, c in enumerate(cats)}
        images = {im["id"]: im for im in data["images"]}
        paths, labels, boxes, image_of, ann_ids = [], [], [], [], []
        for k, a in enumerate(data["annotations"]):
            where = f"{ann_path}: annotation id {a['id']}"
            if a["image_id"] not in images:
                raise ErfLabError(f"{where}: image_id {a['image_id']!r} is not in 'images'")
            if a["category_id"] not in label_of:
                raise ErfLabError(f"{where}: category_id {a['category_id']!r} is not in 'categories'")
            box = a["bbox"]
            if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
                raise ErfLabError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {box!r}")
            x, y, w, h = (float(v) for v in box)
            im = images[a["image_id"]]
            iw, ih = im["width"], im["height"]
            if not (_number(iw) and _number(ih) and iw > 0 and ih > 0):
                raise ErfLabError(f"{ann_path}: image id {im['id']}: width/height must be positive numbers")
            if w <= 0 or h <= 0:
                raise ErfLabError(f"{where}: bbox {box} has a non-positive width or height")
            t = BOX_TOLERANCE
            if x < -t or y < -t or x + w > iw + t or y + h > ih + t:
                raise ErfLabError(f"{where}: bbox {box} lies outside its image {im['file_name']} ({iw}x{ih})")
            if a.get("iscrowd", 0) and not crowd:
                continue
            x0, y0 = max(x, 0.0), max(y, 0.0)
            box = [x0, y0, min(x + w, iw) - x0, min(y + h, ih) - y0]
            if np.sqrt(box[2] * box[3]) < min_size:
                continue
            paths.append(os.path.join(images_dir, str(im["file_name"])))
            labels.append(label_of[a["category_id"]])
            boxes.append(box)
            image_of.append((iw, ih))
            ann_ids.append(a["id"])
        if not paths:
            raise ErfLabError(f"{ann_path}: no usable objects (after skipping crowd and objects under {min_size:g} px)")

        boxes_np = np.asarray(boxes, dtype=np.float64)
        sizes = np.sqrt(boxes_np[:, 2] * boxes_np[:, 3])
        keep = subset_indices(len(paths), num_images, seed)
        keep = self._check_files(paths, keep, skip_bad, ann_path)
        self._paths, self._boxes, self._image_sizes = paths, boxes_np, image_of
        mean, std = channel_stats(channels, IMAGENET_MEAN, IMAGENET_STD)
        self._setup(
            spec=spec, split=split, class_names=[str(c["name"]) for c in cats], labels=np.asarray(labels),
            sizes=sizes, size_bins=size_bins, image_size=image_size, channels=channels, mean=mean, std=std,
            num_images=None, seed=seed, indices=keep,
        )
        self.has_splits = False
        self.annotation_ids = [ann_ids[i] for i in keep]
        self.object_boxes = boxes_np[keep]

    @staticmethod
    def _check_files(paths: List[str], keep: np.ndarray, skip_bad: bool, ann_path: str) -> np.ndarray:
        unique = sorted({paths[i] for i in keep})
        missing = [p for p in unique if not os.path.isfile(p)]
        if missing and not skip_bad:
            raise ErfLabError(f"{missing[0]}: image file not found ({len(missing)} of {len(unique)} referenced by "
                              f"{ann_path} are missing); check IMAGES_DIR, or pass skip_bad=True (--skip-bad)")
        if missing:
            warnings.warn(f"erf-lab: skipped the objects of {len(missing)} missing image file(s) (first: {missing[0]})")
        present = [p for p in unique if p not in set(missing)]
        if not present:
            raise ErfLabError(f"{ann_path}: none of the referenced image files exist")
        good = {present[i] for i in filter_readable(present, skip_bad, ann_path)}
        return np.asarray([i for i in keep if paths[i] in good], dtype=np.int64)

    def _load(self, j: int) -> Tuple[Tensor, Tensor]:
        image = load_image(self._paths[j], self.channels)
        x, y, w, h = self._boxes[j]
        oh, ow = self.image_size
        if self.mode == "full":
            iw, ih = image.size
            sx, sy = ow / iw, oh / ih
            return to_tensor(image, self.image_size), torch.tensor([x * sx, y * sy, w * sx, h * sy], dtype=torch.float32)
        side = max(w, h) * (1.0 + 2.0 * self.margin)
        cx, cy = x + w / 2.0, y + h / 2.0
        left, top, side = int(np.floor(cx - side / 2.0)), int(np.floor(cy - side / 2.0)), int(np.ceil(side))
        crop = image.crop((left, top, left + side, top + side))  # black outside the photo
        sx, sy = ow / side, oh / side
        box = torch.tensor([(x - left) * sx, (y - top) * sy, w * sx, h * sy], dtype=torch.float32)
        return to_tensor(crop, self.image_size), box
