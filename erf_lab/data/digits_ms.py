"""``digits-ms``: the embedded multi-scale digits data set.

Built deterministically from real data that ships with scikit-learn, nothing downloaded:
the 1,797 handwritten digits of ``sklearn.datasets.load_digits`` (8x8, ten classes) are
pasted at many scales and positions onto crops of ``load_sample_images`` (two photographs).

For every sample (all random: the 14 uniforms :data:`DRAWS` of one seeded generator):

* a background: a square crop of a random photograph (side log-uniform between the image
  side and the photo's height), resized to the image side with antialiasing (an image pyramid
  of 2x2 area averages per photograph, then bilinear from the level on which the crop is 1-2x
  the image side; :class:`PhotoPyramids`), mirrored with probability 0.5, at 0.15-0.4 of its
  contrast (so the digit is the salient object; textures stay visible) and 0.8-1.2 of its
  brightness (``jitter=0``: fixed 0.275 and 1), rounded to whole 8-bit levels;
* an object size ``s``, log-uniform in ``[0.12, 0.84] x`` image side (a 7x range: at 64 px,
  7.7 to 54 px, so the smallest glyph keeps about its native 8x8 resolution) and drawn
  independently of the class; the glyph is resized (bilinear, antialiased when shrinking) so
  that its ink box has ``sqrt(w * h) ~ s`` (only glyphs too tall for the image at the top
  sizes are shrunk to fit: 0.95 x side);
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
and distribution; a new background, size, position and ink), so a model sees a new image of
each glyph every epoch instead of memorising a few renders. An item's draws are a function of
``(seed, e, item)`` alone (:func:`fresh_draws`, a counter-based generator), so its render is
the same in any batch, order or DataLoader worker; a DataLoader batch is rendered together
(:meth:`DigitsMS.__getitems__`) by the renderer that made the cached splits
(:func:`render_batch`). Epoch 0 (and any use that never calls ``set_epoch``) reads the cached
renders.

:meth:`DigitsMS.set_size_floor` narrows the object sizes of fresh renders to the larger ones
(a training curriculum; the cached splits keep the full range).

Spec options: ``digits-ms:SIZE`` or ``digits-ms:size=64,seed=0,renders=4,jitter=1,fresh=1``.
"""
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ErfLabError
from ._cache import cached_arrays
from .base import SampleDataset
from .bins import SizeBins, bin_of

GENERATOR_VERSION = 5  # 5: pyramid backgrounds, batched renderer, Philox draws for fresh renders
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.1}  # test: the rest
EVAL_RENDERS = 2
SIZE_RANGE = (0.12, 0.84)  # a 7x range; 0.12 x 64 px keeps the 8x8 glyph at native resolution
BG_CONTRAST = (0.15, 0.4)  # photographs at reduced contrast, so the digit is the salient object
INK_SPREAD = 0.3  # ink channels within 0.3 of black (bright background) or white (dark background)
ALPHA_CUT = 0.05
_CHUNK = 16  # samples rendered together: a chunk's images stay in the CPU's cache
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


class PhotoPyramids:
    """Background photographs as image pyramids, for antialiased square crops at any scale.

    Level 0 is a photograph (float32 in [0, 1]); level ``k + 1`` averages the 2x2 blocks of
    level ``k`` (area averaging; an odd last row or column is repeated), down to the last level
    of at least ``min_side`` rows and columns. A square crop of side ``c`` resized to ``size``
    is sampled bilinearly from level ``k = floor(log2(c / size))`` (0 when the crop is smaller
    than ``size``), where the crop is 1-2x the output side: every output pixel blends level
    pixels less than 2 apart, each of which already averages ``2^k x 2^k`` photo pixels.
    All levels of all photographs are packed into one atlas (each level with a one-pixel border
    copied from its edge), so a batch of crops is one :func:`torch.nn.functional.grid_sample`.

    Args:
        photos (list[numpy.ndarray[H, W, 3]]): uint8 RGB photographs.
        min_side (int): the smallest level side kept (the smallest output ``size`` served).
    """

    def __init__(self, photos: Sequence[np.ndarray], min_side: int = 16) -> None:
        pyramids = []
        for photo in photos:
            levels = [np.asarray(photo, dtype=np.float32) / 255.0]
            while min(-(-levels[-1].shape[0] // 2), -(-levels[-1].shape[1] // 2)) >= min_side:
                a = levels[-1]
                a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
                levels.append((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * np.float32(0.25))
            pyramids.append(levels)
        n_levels = max(len(levels) for levels in pyramids)
        self.shapes = [tuple(p[0].shape[:2]) for p in pyramids]  # (H, W) of each photograph
        self.num_levels = np.array([len(p) for p in pyramids], np.int64)
        self.level_hw = np.ones((len(pyramids), n_levels, 2), np.int64)
        self.level_origin = np.zeros((len(pyramids), n_levels, 2), np.int64)
        # pack: per photograph, level 0 with levels 1.. stacked in a column to its right
        x, height = 0, 0
        for i, levels in enumerate(pyramids):
            h0, w0 = levels[0].shape[:2]
            self.level_hw[i, 0], self.level_origin[i, 0] = (h0, w0), (1, x + 1)
            y = 0
            for k, lev in enumerate(levels[1:], 1):
                self.level_hw[i, k], self.level_origin[i, k] = lev.shape[:2], (y + 1, x + w0 + 3)
                y += lev.shape[0] + 2
            height = max(height, h0 + 2, y)
            x += w0 + 2 + (levels[1].shape[1] + 2 if len(levels) > 1 else 0)
        atlas = np.zeros((height, x, 3), np.float32)
        for i, levels in enumerate(pyramids):
            for k, lev in enumerate(levels):
                (oy, ox), (h, w) = self.level_origin[i, k], self.level_hw[i, k]
                atlas[oy - 1:oy + h + 1, ox - 1:ox + w + 1] = np.pad(lev, ((1, 1), (1, 1), (0, 0)), mode="edge")
        self.atlas = torch.from_numpy(atlas).permute(2, 0, 1)[None].contiguous()  # [1, 3, H, W]

    def __len__(self) -> int:
        return len(self.shapes)

    def crops(self, photo: np.ndarray, y0: np.ndarray, x0: np.ndarray, side: np.ndarray, size: int,
              mirror: np.ndarray) -> Tensor:
        """Square crops ``[y0, y0 + side) x [x0, x0 + side)`` of photographs ``photo`` (int arrays
        ``[B]``), resized to ``size`` (antialiased, see the class) and mirrored left-right where
        ``mirror``: ``FloatTensor[B, 3, size, size]`` in [0, 1]."""
        photo, side = np.asarray(photo, np.int64), np.asarray(side, np.int64)
        ratio = side // size  # exact: the level k has 2^k <= side / size < 2^(k + 1)
        level = np.zeros(len(photo), np.int64)
        for k in range(1, self.level_hw.shape[1]):
            level += ratio >= 2 ** k
        level = np.minimum(level, self.num_levels[photo] - 1)
        f = 0.5 ** level  # level pixels per photo pixel
        t = (np.arange(size) + 0.5) / size
        # pixel-centre coordinates in the level (pixel p covers [p, p + 1)), clamped to it
        ty = (np.asarray(y0) * f)[:, None] + t * (side * f)[:, None] - 0.5
        tx = (np.asarray(x0) * f)[:, None] + t * (side * f)[:, None] - 0.5
        tx = np.where(np.asarray(mirror, bool)[:, None], tx[:, ::-1], tx)
        hw, origin = self.level_hw[photo, level], self.level_origin[photo, level]
        ty = np.clip(ty, 0, (hw[:, 0] - 1)[:, None]) + origin[:, 0, None]
        tx = np.clip(tx, 0, (hw[:, 1] - 1)[:, None]) + origin[:, 1, None]
        height, width = self.atlas.shape[2:]
        grid = np.empty((len(photo), size, size, 2), np.float32)
        grid[..., 0] = ((2 * tx + 1) / width - 1)[:, None, :]
        grid[..., 1] = ((2 * ty + 1) / height - 1)[:, :, None]
        return F.grid_sample(self.atlas.expand(len(photo), -1, -1, -1), torch.from_numpy(grid), mode="bilinear",
                             padding_mode="border", align_corners=False)


@functools.lru_cache(maxsize=None)
def _glyph_filter(side: int) -> np.ndarray:
    """``float32[side, 8]``: PIL's bilinear resize of 8 pixels to ``side`` as a matrix (a
    triangle filter whose support widens when shrinking, so shrinking is antialiased)."""
    scale = 8.0 / side
    support = max(scale, 1.0)
    centre = (np.arange(side) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(8) + 0.5 - centre[:, None]) / support)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _glyph_alphas(glyphs: np.ndarray, sides: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Alphas of 8x8 digits ``glyphs`` (float32[B, 8, 8] in [0, 1]) resized to ``sides`` x
    ``sides`` pixels (bilinear, antialiased when shrinking, as PIL's resize), alpha below
    :data:`ALPHA_CUT` set to zero: ``float32[B, M, M]`` (padded with zeros to the largest side)
    and the tight ink box of each, ``int[B, 4]`` (row0, row1, col0, col1; end exclusive)."""
    m = max(sides)
    a = np.zeros((len(sides), m, m), np.float32)
    for b, side in enumerate(sides):
        w = _glyph_filter(side)
        a[b, :side, :side] = w @ glyphs[b] @ w.T
    ink = a >= ALPHA_CUT
    a *= ink
    rows, cols = ink.any(2), ink.any(1)
    blank = ~rows.any(1)
    if blank.any():  # a blank glyph cannot happen with load_digits; keep one opaque pixel
        a[blank, 0, 0], rows[blank, 0], cols[blank, 0] = 1.0, True, True
    box = np.stack([rows.argmax(1), m - rows[:, ::-1].argmax(1), cols.argmax(1), m - cols[:, ::-1].argmax(1)], 1)
    return a, box


def render_glyph(glyph: np.ndarray, scale: float) -> np.ndarray:
    """Alpha ``float32[h, w]`` of an 8x8 digit (values 0..16) at ``scale`` pixels per cell
    (bilinear, antialiased when shrinking, as PIL's resize), cropped to its tight ink box
    (alpha below :data:`ALPHA_CUT` set to zero)."""
    g = np.asarray(glyph, np.float32).reshape(1, 8, 8) * np.float32(1 / 16)
    a, (r0, r1, c0, c1) = (x[0] for x in _glyph_alphas(g, [max(1, int(round(8 * scale)))]))
    return a[r0:r1, c0:c1]


#: The uniform draws that make one sample, in this order (:func:`render_batch`).
DRAWS = ("photo", "crop_side", "crop_y", "crop_x", "mirror", "contrast", "brightness", "object_size",
         "y", "x", "ink_r", "ink_g", "ink_b", "opacity")
_D = {name: i for i, name in enumerate(DRAWS)}


_MASK32 = 0xFFFFFFFF


def philox4x32(counter: np.ndarray, key: Tuple[int, int], rounds: int = 10) -> np.ndarray:
    """The Philox4x32 counter-based generator (Salmon, Moraes, Dror, Shaw, "Parallel random
    numbers: as easy as 1, 2, 3", SC 2011; Random123's ``philox4x32_R``), vectorised:
    ``uint32[..., 4]`` outputs for the counters ``uint32[..., 4]`` under ``key`` (two uint32)."""
    c = [np.asarray(counter, np.uint64)[..., i] for i in range(4)]
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
        p0, p1 = c[0] * np.uint64(0xD2511F53), c[2] * np.uint64(0xCD9E8D57)  # exact: < 2^64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & np.uint64(_MASK32),
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & np.uint64(_MASK32)]
    return np.stack(c, -1).astype(np.uint32)


def fresh_draws(seed: int, epoch: int, items: Sequence[int]) -> np.ndarray:
    """The :data:`DRAWS` of the fresh renders of train ``items`` at ``epoch``: float64[B, len(DRAWS)].

    Draw ``d`` of item ``j`` is word ``d % 4`` of Philox4x32-10 at counter ``(j, epoch, d // 4,
    0)`` under key ``(seed mod 2^32, 3)``, as ``(word + 0.5) / 2^32``: a function of ``(seed,
    epoch, j)`` alone, so an item is the same in any batch, order or worker.
    """
    j = np.asarray(items, np.int64).reshape(-1)
    blocks = -(-len(DRAWS) // 4)
    counter = np.zeros((len(j), blocks, 4), np.uint64)
    counter[..., 0], counter[..., 1], counter[..., 2] = j[:, None], int(epoch), np.arange(blocks)
    words = philox4x32(counter, (int(seed), 3)).reshape(len(j), -1)[:, :len(DRAWS)]
    return (words + 0.5) * 2.0 ** -32


def _uniform_int(u: float, n: int) -> int:
    """An integer uniform in ``[0, n)`` from a uniform ``u`` in [0, 1)."""
    return min(int(u * n), n - 1)


def render_batch(draws: np.ndarray, glyphs: np.ndarray, photos: PhotoPyramids, size: int, jitter: bool,
                 with_background: bool = False, size_range: Tuple[float, float] = SIZE_RANGE) -> Dict[str, np.ndarray]:
    """Samples from their random draws, as specified in the module docstring.

    Args:
        draws (numpy.ndarray[B, len(DRAWS)]): uniforms in [0, 1), one row per sample, columns
            as :data:`DRAWS`. A sample depends on its own row only (per-sample scalar maths,
            element-wise or per-sample array operations), never on the rest of the batch.
        glyphs (numpy.ndarray[B, 8, 8]): the digits (values 0..16).
        photos (PhotoPyramids): the background photographs.
        size_range: object sizes as fractions of ``size`` (log-uniform between them).

    Returns:
        ``{"image": uint8[B, 3, size, size], "box": float32[B, 4]}`` (channels first; box
        ``[x, y, w, h]``), plus ``"background"`` (uint8[B, 3, size, size]) with ``with_background``.
    """
    image, boxes, background = _render(draws, glyphs, photos, size, jitter, with_background, size_range)
    out = {"image": image.numpy().astype(np.uint8), "box": boxes}
    if background is not None:
        out["background"] = background.astype(np.uint8)
    return out


def _render(draws: np.ndarray, glyphs: np.ndarray, photos: PhotoPyramids, size: int, jitter: bool,
            with_background: bool = False, size_range: Tuple[float, float] = SIZE_RANGE,
            ) -> Tuple[Tensor, np.ndarray, Optional[np.ndarray]]:
    """:func:`render_batch` with images as ``FloatTensor[B, 3, size, size]`` of whole numbers
    0..255 (what the uint8 images hold), and the backgrounds (float32) or None."""
    u = np.asarray(draws, np.float64).reshape(-1, len(DRAWS))
    n = len(u)
    if n == 0:
        empty = np.zeros((0, 3, size, size), np.float32)
        return torch.from_numpy(empty), np.zeros((0, 4), np.float32), (empty if with_background else None)
    glyphs = np.asarray(glyphs).reshape(n, 8, 8)
    ink = glyphs >= 1
    ink_rows, ink_cols = ink.any(2), ink.any(1)
    ink_h = (8 - ink_rows.argmax(1) - ink_rows[:, ::-1].argmax(1)).tolist()
    ink_w = (8 - ink_cols.argmax(1) - ink_cols[:, ::-1].argmax(1)).tolist()
    photo, y0, x0, crop = (np.empty(n, np.int64) for _ in range(4))
    sides = []
    lo_size, hi_size = math.log(size_range[0] * size), math.log(size_range[1] * size)
    for b, ub in enumerate(u.tolist()):  # scalar maths per sample: never a function of the batch
        # background crop: side log-uniform in [size, photo height]
        p = _uniform_int(ub[_D["photo"]], len(photos))
        ph, pw = photos.shapes[p]
        lo, hi = math.log(min(size, ph)), math.log(ph)
        c = int(round(math.exp(lo + (hi - lo) * ub[_D["crop_side"]])))
        photo[b], crop[b] = p, c
        y0[b], x0[b] = _uniform_int(ub[_D["crop_y"]], ph - c + 1), _uniform_int(ub[_D["crop_x"]], pw - c + 1)
        # object size independent of class; glyph scaled so its ink box has sqrt(w*h) ~ s
        s = math.exp(lo_size + (hi_size - lo_size) * ub[_D["object_size"]])
        ih, iw = ink_h[b], ink_w[b]
        scale = min(s / math.sqrt(ih * iw), 0.95 * size / (max(ih, iw) + 1))
        sides.append(max(1, int(round(8 * scale))))
    alpha, gbox = _glyph_alphas(glyphs.astype(np.float32) * np.float32(1 / 16), sides)
    alpha *= (0.9 + 0.1 * u[:, _D["opacity"]]).astype(np.float32)[:, None, None]
    bh, bw = gbox[:, 1] - gbox[:, 0], gbox[:, 3] - gbox[:, 2]
    ys = np.minimum((u[:, _D["y"]] * (size - bh + 1)).astype(np.int64), size - bh)  # uniform, glyph inside
    xs = np.minimum((u[:, _D["x"]] * (size - bw + 1)).astype(np.int64), size - bw)

    # backgrounds: crops resized (antialiased), maybe mirrored, contrast and brightness jitter
    image = photos.crops(photo, y0, x0, crop, size, u[:, _D["mirror"]] < 0.5)
    v = image.numpy()  # the same memory, edited in place below
    if jitter:
        contrast = BG_CONTRAST[0] + (BG_CONTRAST[1] - BG_CONTRAST[0]) * u[:, _D["contrast"]]
        brightness = 0.8 + 0.4 * u[:, _D["brightness"]]
    else:
        contrast, brightness = np.full(n, np.mean(BG_CONTRAST)), np.ones(n)
    mean = v.reshape(n, -1).sum(1).astype(np.float64) / v[0].size  # one pairwise sum per sample
    # (bg - mean) * contrast + mean * brightness, on the 0..255 scale, rounded to whole levels
    v *= (255.0 * contrast).astype(np.float32)[:, None, None, None]
    v += (255.0 * mean * (brightness - contrast)).astype(np.float32)[:, None, None, None]
    np.clip(v, 0.0, 255.0, out=v)
    np.round(v, out=v)
    background = v.copy() if with_background else None

    # ink: a colour contrasting with the background under the box (dark on bright), pasted with its alpha
    ink = INK_SPREAD * u[:, _D["ink_r"]:_D["ink_b"] + 1]
    dark, light = (255.0 * ink).astype(np.float32), (255.0 * (1.0 - ink)).astype(np.float32)
    half = (0.5 * 255.0 * bh * bw).tolist()
    for b, (y, x, h, w, r0, _, c0, _) in enumerate(np.concatenate([ys[:, None], xs[:, None], bh[:, None],
                                                                    bw[:, None], gbox], 1).tolist()):
        region = v[b, :, y:y + h, x:x + w]
        r, g, bl = region.sum(axis=(1, 2)).tolist()
        colour = dark[b] if 0.299 * r + 0.587 * g + 0.114 * bl >= half[b] else light[b]
        region += (colour[:, None, None] - region) * alpha[b, r0:r0 + h, c0:c0 + w]
        np.round(region, out=region)
    boxes = np.stack([xs, ys, bw, bh], 1).astype(np.float32)
    return image, boxes, background


def render_sample(
    rng: Union[np.random.Generator, np.ndarray], glyph: np.ndarray, photos: Union[PhotoPyramids, Sequence[np.ndarray]],
    size: int, jitter: bool,
) -> Dict[str, np.ndarray]:
    """One sample: ``image`` and ``background`` (uint8[size, size, 3]), ``box`` [x, y, w, h].

    ``rng`` is a generator (one ``rng.random(len(DRAWS))`` call) or the sample's draws
    (float[len(DRAWS)], e.g. a row of :func:`fresh_draws`). ``photos`` is best a
    :class:`PhotoPyramids` (a list of photographs is converted on every call).
    """
    if not isinstance(photos, PhotoPyramids):
        photos = PhotoPyramids(photos)
    draws = rng.random(len(DRAWS)) if isinstance(rng, np.random.Generator) else np.asarray(rng, np.float64)
    s = render_batch(draws[None], np.asarray(glyph)[None], photos, size, jitter, with_background=True)
    return {"image": s["image"][0].transpose(1, 2, 0), "background": s["background"][0].transpose(1, 2, 0),
            "box": s["box"][0]}


def generate(size: int = 64, seed: int = 0, renders: int = 4, jitter: int = 1, progress: bool = True,
             splits: Sequence[str] = ("train", "val", "test")) -> Dict[str, np.ndarray]:
    """The splits as arrays: ``{split}_images`` uint8[N, size, size, 3], ``{split}_labels``,
    ``{split}_boxes`` float32[N, 4], ``{split}_glyphs`` (source digit index), plus ``mean``/``std``
    (of the train split; only when it is generated). Each split has its own generator (the
    order of its items, then each item's :data:`DRAWS`), so generating a subset of ``splits``
    gives the same arrays for them. Rendered in batches by :func:`render_batch`, the renderer
    of fresh training items too."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs, labels = digits.images, digits.target.astype(np.int64)
    photos = PhotoPyramids(_photos())
    splits = {k: v for k, v in glyph_splits(labels, seed).items() if k in splits}
    out: Dict[str, np.ndarray] = {}
    total = sum(len(v) * (renders if k == "train" else EVAL_RENDERS) for k, v in splits.items())
    from ..progress import progress as progress_bar

    bar = progress_bar(total=total, desc=f"generating digits-ms:{size} (once, then cached)", enabled=progress, leave=False)
    for split, idx in splits.items():
        rng = np.random.default_rng([seed, 2, ("train", "val", "test").index(split)])
        order = np.tile(idx, renders if split == "train" else EVAL_RENDERS)
        order = order[rng.permutation(len(order))]
        draws = rng.random((len(order), len(DRAWS)))
        images = np.empty((len(order), size, size, 3), np.uint8)
        boxes = np.empty((len(order), 4), np.float32)
        for i in range(0, len(order), _CHUNK):
            sl = slice(i, i + _CHUNK)
            sample = render_batch(draws[sl], glyphs[order[sl]], photos, size, bool(jitter))
            images[sl], boxes[sl] = sample["image"].transpose(0, 2, 3, 1), sample["box"]
            bar.update(len(sample["box"]))
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
    (bilinear) and boxes. :meth:`set_epoch` selects fresh train renders (``fresh=1``);
    :meth:`__getitems__` (what a DataLoader calls) renders a batch's fresh items together.
    """

    def __init__(self, spec: str, options: Dict[str, str], split: str, image_size: Optional[Tuple[int, int]],
                 channels: int, num_images: Optional[int], seed: int, size_bins: SizeBins) -> None:
        opts = _options(options, spec)
        self._opts = opts
        self.epoch = 0
        self.size_range = SIZE_RANGE
        self._render_src: Optional[Tuple[np.ndarray, PhotoPyramids]] = None
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
        self._mean255, self._std255 = self._mean_t * 255.0, self._std_t * 255.0

    @property
    def renders_on_the_fly(self) -> bool:
        """True when training items are rendered per epoch (``fresh=1`` with a train part),
        which :meth:`set_size_floor` (the training curriculum) needs."""
        return bool(self._opts["fresh"]) and self._train_part is not None

    def set_epoch(self, epoch: int) -> None:
        """Use the train renders of ``epoch``: the cached ones for 0, fresh ones after
        (only with ``fresh=1``; val and test items never change)."""
        self.epoch = int(epoch)
        if self.epoch > 0 and self.renders_on_the_fly:
            self._sources()  # here, so that DataLoader workers forked after this inherit them

    def set_size_floor(self, fraction: float) -> None:
        """Fresh train renders draw object sizes from ``[fraction, 0.84] x`` side (log-uniform)
        instead of the full ``[0.12, 0.84]``: a curriculum that starts with large objects
        (:func:`erf_lab.train.train`'s ``size_curriculum_epochs``). Cached renders, val and
        test never change."""
        if not SIZE_RANGE[0] <= fraction <= SIZE_RANGE[1]:
            raise ErfLabError(f"size floor must be within {SIZE_RANGE}, got {fraction}")
        self.size_range = (float(fraction), SIZE_RANGE[1])

    def _sources(self) -> Tuple[np.ndarray, PhotoPyramids]:
        """The glyphs and photographs fresh renders are made from (loaded once, ~1 s)."""
        if self._render_src is None:
            from sklearn.datasets import load_digits

            self._render_src = (load_digits().images, PhotoPyramids(_photos()))
        return self._render_src

    def _part(self, j: np.ndarray) -> np.ndarray:
        """Which of the loaded splits items ``j`` (of the full split list) belong to."""
        return np.searchsorted(self._offsets, j, side="right") - 1

    def _is_fresh(self, j: np.ndarray) -> np.ndarray:
        if not (self.epoch > 0 and self._opts["fresh"] and self._train_part is not None):
            return np.zeros(len(j), bool)
        return self._part(j) == self._train_part

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, object]]:
        """Items ``indices`` at once (what :class:`torch.utils.data.DataLoader` calls for a
        batch): the same dicts as ``[self[i] for i in indices]``, fresh renders made together."""
        n = len(self)
        pos = np.array([int(i) for i in indices], np.int64)
        bad = (pos < -n) | (pos >= n)
        if bad.any():
            raise IndexError(f"index {int(pos[bad][0])} out of range for a data set of {n} items")
        pos = pos % n if n else pos
        j_all = self._indices[pos]
        draws = fresh_draws(self._opts["seed"], self.epoch, j_all) if self._is_fresh(j_all).any() else None
        items: List[Dict[str, object]] = []
        for start in range(0, len(pos), _CHUNK):  # chunks small enough to stay in the CPU cache
            p, j = pos[start:start + _CHUNK], j_all[start:start + _CHUNK]
            images, boxes, fresh = self._load_many(j, None if draws is None else draws[start:start + _CHUNK])
            images.sub_(self._mean255).div_(self._std255)  # (x / 255 - mean) / std, one division
            bins = self.size_bins[p].copy()
            if fresh.any() and self.size_bin_edges is not None:
                # the bin of the fresh render's box, measured at the generated side like the edges
                fb = boxes.numpy()[fresh].astype(np.float64)
                scale = self.generated_size / np.sqrt(self.image_size[0] * self.image_size[1])
                bins[fresh] = bin_of(np.sqrt(fb[:, 2] * fb[:, 3]) * scale, self.size_bin_edges)
            labels, bins, j = self.labels[p].tolist(), bins.tolist(), j.tolist()
            items += [{"image": images[k], "label": labels[k], "box": boxes[k], "size_bin": bins[k], "index": j[k]}
                      for k in range(len(j))]
        return items

    def _load_many(self, j: np.ndarray, draws: Optional[np.ndarray] = None) -> Tuple[Tensor, Tensor, np.ndarray]:
        """Images ``FloatTensor[B, C, H, W]`` on the 0..255 scale, boxes ``[B, 4]`` and fresh
        flags of items ``j`` (of the full split list). A fresh item ``j`` is rendered from
        :func:`fresh_draws` of ``(seed, epoch, j)`` (``draws``: those of all ``j``, when known),
        so it is the same in any batch."""
        size = self.generated_size
        fresh = self._is_fresh(j)
        boxes = np.empty((len(j), 4), np.float32)
        if fresh.any():
            glyph_images, photos = self._sources()
            jf = j[fresh]
            draws = fresh_draws(self._opts["seed"], self.epoch, jf) if draws is None else draws[fresh]
            rendered, boxes[fresh], _ = _render(draws, glyph_images[self._all_glyphs[jf]], photos, size,
                                                bool(self._opts["jitter"]), size_range=self.size_range)
        if fresh.all():
            images = rendered
        else:
            images = torch.empty(len(j), 3, size, size)
            if fresh.any():
                images[torch.from_numpy(fresh)] = rendered
            parts = self._part(j)
            for part in np.unique(parts[~fresh]).tolist():
                sel = ~fresh & (parts == part)
                local = j[sel] - self._offsets[part]
                order = np.argsort(local, kind="stable")  # a memory map reads in order
                raw = np.empty((len(local), size, size, 3), np.uint8)
                raw[order] = self._images[part][local[order]]
                images[torch.from_numpy(sel)] = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
                boxes[sel] = self._all_boxes[j[sel]]
        if self.channels == 1:
            images = images[:, :1] * 0.299 + images[:, 1:2] * 0.587 + images[:, 2:] * 0.114
        box = torch.from_numpy(boxes)
        h, w = self.image_size
        if (h, w) != (size, size):
            images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            box = box * torch.tensor([w, h, w, h], dtype=torch.float32) / size
        return images, box, fresh

    def _load(self, j: int) -> Tuple[Tensor, Tensor]:
        images, boxes, _ = self._load_many(np.array([j], np.int64))
        return images[0] / 255.0, boxes[0]
