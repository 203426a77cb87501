"""``digits-ms``: the embedded multi-scale digits data set.

Built deterministically from real data that ships with scikit-learn, nothing downloaded:
the 1,797 handwritten digits of ``sklearn.datasets.load_digits`` (8x8, ten classes) are
pasted at many scales and positions onto crops of ``load_sample_images`` (two photographs).

For every sample (all random draws from one seeded generator):

* a background: a square crop of a random photograph (side log-uniform between the image
  side and the photo's height), resized to the image side, maybe mirrored, at 0.15-0.4 of its
  contrast (so the digit is the salient object; textures stay visible) and 0.8-1.2 of its
  brightness (``jitter=0``: fixed 0.275 and 1);
* an object size ``s``, log-uniform in ``[0.12, 0.84] x`` image side (a 7x range: at 64 px,
  7.7 to 54 px, so the smallest glyph keeps about its native 8x8 resolution) and drawn
  independently of the class; the glyph is scaled so that its ink box has ``sqrt(w * h) ~ s``
  (only glyphs too tall for the image at the top sizes are shrunk to fit: 0.95 x side);
* an ink colour that contrasts with the background under the box: each channel within 0.3 of
  black on a bright background, of white on a dark one; opacity in [0.9, 1];
* a uniform position with the glyph fully inside the image.

The box ``[x, y, w, h]`` is the tight box of the pasted ink (alpha >= 0.05; fainter alpha is
cut to zero), so every pixel outside the box is exactly background. Splits are disjoint by
source digit, stratified by class: 60% of the glyphs for ``train``, 10% for ``val``, 30% for
``test``; each glyph is rendered ``renders`` times in train (default 4) and twice in val/test.
Size bins are quantiles of ``sqrt(w * h)`` over the train split (same edges for every split).
Images are normalised with the train split's per-channel mean and std.

Training draws fresh renders: with ``fresh=1`` (the default) the train split's items are
re-rendered for every epoch ``e >= 1`` set by :meth:`DigitsMS.set_epoch` (same glyph, label
and distribution; a new background, size, position and ink, seeded by ``(seed, e, item)``),
so a model sees a new image of each glyph every epoch instead of memorising a few renders.
Epoch 0 (and any use that never calls ``set_epoch``) reads the cached renders.

Spec options: ``digits-ms:SIZE`` or ``digits-ms:size=64,seed=0,renders=4,jitter=1,fresh=1``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ErfLabError
from ._cache import cached_arrays
from .base import SampleDataset
from .bins import SizeBins, bin_of

GENERATOR_VERSION = 4
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.1}  # test: the rest
EVAL_RENDERS = 2
SIZE_RANGE = (0.12, 0.84)  # a 7x range; 0.12 x 64 px keeps the 8x8 glyph at native resolution
BG_CONTRAST = (0.15, 0.4)  # photographs at reduced contrast, so the digit is the salient object
INK_SPREAD = 0.3  # ink channels within 0.3 of black (bright background) or white (dark background)
ALPHA_CUT = 0.05
CLASS_NAMES = [str(d) for d in range(10)]
_DEFAULTS = {"size": 64, "seed": 0, "renders": 4, "jitter": 1, "fresh": 1}


def _options(options: Dict[str, str], spec: str) -> Dict[str, int]:
    opts = dict(_DEFAULTS)
    for key, value in options.items():
        key = key or "size"
        if key not in opts:
            raise ErfLabError(f"data spec {spec!r}: unknown option {key!r} (known: {', '.join(_DEFAULTS)})")
        try:
            opts[key] = int(value)
        except ValueError:
            raise ErfLabError(f"data spec {spec!r}: option {key}={value!r} is not an integer") from None
    if opts["size"] < 16:
        raise ErfLabError(f"data spec {spec!r}: size must be >= 16 pixels, got {opts['size']}")
    if opts["renders"] < 1:
        raise ErfLabError(f"data spec {spec!r}: renders must be >= 1, got {opts['renders']}")
    return opts


def glyph_splits(labels: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    """Source-digit indices of each split: stratified by class, disjoint, seeded."""
    rng = np.random.default_rng([seed, 1])
    parts: Dict[str, List[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(SPLIT_FRACTIONS["train"] * len(idx)))
        n_val = int(round(SPLIT_FRACTIONS["val"] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def _photos() -> List[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]


def render_glyph(glyph: np.ndarray, scale: float) -> np.ndarray:
    """Alpha ``float32[h, w]`` of an 8x8 digit (values 0..16) at ``scale`` pixels per cell,
    cropped to its tight ink box (alpha below :data:`ALPHA_CUT` set to zero)."""
    side = max(1, int(round(8 * scale)))
    g = Image.fromarray(np.ascontiguousarray(glyph, dtype=np.float32) / 16.0, mode="F")
    # PIL's bilinear filter widens its support when shrinking (antialiasing) and is single-threaded
    a = np.clip(np.asarray(g.resize((side, side), Image.BILINEAR), dtype=np.float32), 0.0, 1.0)
    a[a < ALPHA_CUT] = 0.0
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    if rows.size == 0:  # a blank glyph cannot happen with load_digits; keep one pixel
        return np.ones((1, 1), np.float32)
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def render_sample(
    rng: np.random.Generator, glyph: np.ndarray, photos: List[np.ndarray], size: int, jitter: bool
) -> Dict[str, np.ndarray]:
    """One sample: ``image`` and ``background`` (uint8[size, size, 3]), ``box`` [x, y, w, h]."""
    # background: a square crop of a photograph, resized, maybe mirrored, jittered
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    crop = int(round(np.exp(rng.uniform(np.log(min(size, ph)), np.log(ph)))))
    y0, x0 = rng.integers(0, ph - crop + 1), rng.integers(0, pw - crop + 1)
    bg = Image.fromarray(photo[y0:y0 + crop, x0:x0 + crop]).resize((size, size), Image.BILINEAR)
    bg = np.asarray(bg, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    contrast, brightness = (rng.uniform(*BG_CONTRAST), rng.uniform(0.8, 1.2)) if jitter else (np.mean(BG_CONTRAST), 1.0)
    bg = np.clip((bg - bg.mean()) * contrast + bg.mean() * brightness, 0.0, 1.0)

    # object size independent of class; glyph scaled so its ink box has sqrt(w*h) ~ s
    s = np.exp(rng.uniform(np.log(SIZE_RANGE[0] * size), np.log(SIZE_RANGE[1] * size)))
    ink = glyph >= 1
    ink_h, ink_w = np.flatnonzero(ink.any(1)).size, np.flatnonzero(ink.any(0)).size
    scale = s / np.sqrt(ink_h * ink_w)
    scale = min(scale, 0.95 * size / (max(ink_h, ink_w) + 1))
    alpha = render_glyph(glyph, scale)
    bh, bw = alpha.shape
    y, x = int(rng.integers(0, size - bh + 1)), int(rng.integers(0, size - bw + 1))

    # ink colour contrasting with the background under the box, opacity
    region = bg[y:y + bh, x:x + bw]
    lum = float((region @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
    colour = rng.uniform(0.0, INK_SPREAD, 3).astype(np.float32)
    colour = colour if lum >= 0.5 else 1.0 - colour
    opacity = rng.uniform(0.9, 1.0)
    background = np.round(bg * 255.0).astype(np.uint8)
    image = background.copy()
    a = (opacity * alpha)[..., None]
    image[y:y + bh, x:x + bw] = np.round((region * (1 - a) + colour * a) * 255.0).astype(np.uint8)
    return {"image": image, "background": background, "box": np.array([x, y, bw, bh], np.float32)}


def generate(size: int = 64, seed: int = 0, renders: int = 4, jitter: int = 1, progress: bool = True,
             splits: Sequence[str] = ("train", "val", "test")) -> Dict[str, np.ndarray]:
    """The splits as arrays: ``{split}_images`` uint8[N, size, size, 3], ``{split}_labels``,
    ``{split}_boxes`` float32[N, 4], ``{split}_glyphs`` (source digit index), plus ``mean``/``std``
    (of the train split; only when it is generated). Each split has its own generator, so
    generating a subset of ``splits`` gives the same arrays for them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs, labels = digits.images, digits.target.astype(np.int64)
    photos = _photos()
    splits = {k: v for k, v in glyph_splits(labels, seed).items() if k in splits}
    out: Dict[str, np.ndarray] = {}
    total = sum(len(v) * (renders if k == "train" else EVAL_RENDERS) for k, v in splits.items())
    bar = tqdm(total=total, desc=f"generating digits-ms:{size} (once, then cached)", disable=not progress, leave=False)
    for split, idx in splits.items():
        rng = np.random.default_rng([seed, 2, ("train", "val", "test").index(split)])
        order = np.tile(idx, renders if split == "train" else EVAL_RENDERS)
        order = order[rng.permutation(len(order))]
        images = np.empty((len(order), size, size, 3), np.uint8)
        boxes = np.empty((len(order), 4), np.float32)
        for i, g in enumerate(order):
            sample = render_sample(rng, glyphs[g], photos, size, bool(jitter))
            images[i], boxes[i] = sample["image"], sample["box"]
            bar.update()
        out[f"{split}_images"], out[f"{split}_boxes"] = images, boxes
        out[f"{split}_labels"], out[f"{split}_glyphs"] = labels[order], order.astype(np.int64)
    bar.close()
    if "train" in splits:
        train = out["train_images"].reshape(-1, 3).astype(np.float64) / 255.0
        out["mean"], out["std"] = train.mean(0), train.std(0)
    return out


def load_arrays(size: int = 64, seed: int = 0, renders: int = 4, jitter: int = 1) -> Dict[str, np.ndarray]:
    """:func:`generate`'s arrays through the cache (generated on first use, memory-mapped after)."""
    opts = dict(size=size, seed=seed, renders=renders, jitter=jitter)
    return cached_arrays("digits-ms", dict(opts, version=GENERATOR_VERSION), lambda: generate(**opts))


class DigitsMS(SampleDataset):
    """The ``digits-ms`` data set (see the module docstring); items as :class:`SampleDataset`.

    Extra attributes: ``glyphs`` (source digit index of each item) and ``boxes`` (those of
    the cached renders). ``image_size`` other than the generated side resizes the images
    (bilinear) and boxes. :meth:`set_epoch` selects fresh train renders (``fresh=1``).
    """

    def __init__(self, spec: str, options: Dict[str, str], split: str, image_size: Optional[Tuple[int, int]],
                 channels: int, num_images: Optional[int], seed: int, size_bins: SizeBins) -> None:
        opts = _options(options, spec)
        self._opts = opts
        self.epoch = 0
        self._render_src: Optional[Tuple[np.ndarray, List[np.ndarray]]] = None
        arrays = load_arrays(**{k: v for k, v in opts.items() if k != "fresh"})
        names = ["train", "val", "test"] if split == "all" else [split]
        self._images = [arrays[f"{n}_images"] for n in names]
        self._train_part = names.index("train") if "train" in names else None
        self._offsets = np.cumsum([0] + [len(a) for a in self._images])
        boxes = np.concatenate([arrays[f"{n}_boxes"] for n in names])
        labels = np.concatenate([arrays[f"{n}_labels"] for n in names])
        glyphs = np.concatenate([arrays[f"{n}_glyphs"] for n in names])
        sizes = np.sqrt(boxes[:, 2].astype(np.float64) * boxes[:, 3])
        tb = arrays["train_boxes"]
        train_sizes = np.sqrt(tb[:, 2].astype(np.float64) * tb[:, 3])
        self.generated_size = opts["size"]
        mean, std = np.asarray(arrays["mean"]), np.asarray(arrays["std"])
        if channels == 1:
            mean, std = mean @ np.array([0.299, 0.587, 0.114]), std @ np.array([0.299, 0.587, 0.114])
            mean, std = [float(mean)], [float(std)]
        self._setup(
            spec=spec, split=split, class_names=CLASS_NAMES, labels=labels, sizes=sizes, size_bins=size_bins,
            image_size=image_size or (opts["size"], opts["size"]), channels=channels, mean=mean, std=std,
            num_images=num_images, seed=seed, bin_reference_sizes=train_sizes,
        )
        self.glyphs = glyphs[self._indices]
        self._all_glyphs = glyphs
        self._all_boxes = boxes
        self.boxes = boxes[self._indices]

    @property
    def renders_on_the_fly(self) -> bool:
        """True when training items are rendered per epoch (``fresh=1`` with a train part):
        CPU work that a DataLoader worker can do beside the training step."""
        return bool(self._opts["fresh"]) and self._train_part is not None

    def set_epoch(self, epoch: int) -> None:
        """Use the train renders of ``epoch``: the cached ones for 0, fresh ones after
        (only with ``fresh=1``; val and test items never change)."""
        self.epoch = int(epoch)
        if self.epoch > 0 and self.renders_on_the_fly:
            self._sources()  # here, so that DataLoader workers forked after this inherit them

    def _sources(self) -> Tuple[np.ndarray, List[np.ndarray]]:
        """The glyphs and photographs fresh renders are made from (loaded once, ~1 s)."""
        if self._render_src is None:
            from sklearn.datasets import load_digits

            self._render_src = (load_digits().images, _photos())
        return self._render_src

    def _fresh_render(self, j: int) -> Tuple[np.ndarray, np.ndarray]:
        glyph_images, photos = self._sources()
        rng = np.random.default_rng([self._opts["seed"], 3, self.epoch, j])
        sample = render_sample(rng, glyph_images[self._all_glyphs[j]], photos, self.generated_size,
                               bool(self._opts["jitter"]))
        return sample["image"], sample["box"]

    def _part(self, j: int) -> int:
        """Which of the loaded splits item ``j`` (of the full split list) belongs to."""
        return int(np.searchsorted(self._offsets, j, side="right") - 1)

    def _is_fresh(self, j: int) -> bool:
        return bool(self.epoch > 0 and self._opts["fresh"] and self._part(j) == self._train_part)

    def __getitem__(self, i: int):
        item = super().__getitem__(i)
        if self._is_fresh(int(item["index"])) and self.size_bin_edges is not None:
            # the bin of the fresh render's box, measured at the generated side like the edges
            w, h = (float(v) for v in item["box"][2:])
            scale = self.generated_size / np.sqrt(self.image_size[0] * self.image_size[1])
            item["size_bin"] = int(bin_of(np.array([np.sqrt(w * h) * scale]), self.size_bin_edges)[0])
        return item

    def _load(self, j: int) -> Tuple[Tensor, Tensor]:
        if self._is_fresh(j):
            raw, box_np = self._fresh_render(j)
        else:
            part = self._part(j)
            raw, box_np = np.asarray(self._images[part][j - self._offsets[part]]), self._all_boxes[j].copy()
        image = torch.from_numpy(raw.astype(np.float32) / 255.0).permute(2, 0, 1)
        if self.channels == 1:
            image = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        box = torch.from_numpy(box_np)
        h, w = self.image_size
        if (h, w) != (self.generated_size, self.generated_size):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            box = box * torch.tensor([w, h, w, h], dtype=torch.float32) / self.generated_size
        return image, box
