"""Reading image files: decode with PIL, convert, resize, and say clearly what went wrong."""
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import ErfLabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_readable(path: str) -> Optional[str]:
    """``None`` when PIL recognises ``path`` as an image, else the reason (for error lines)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def filter_readable(paths: Sequence[str], skip_bad: bool, what: str) -> np.ndarray:
    """Positions in ``paths`` of images PIL can open; the first bad one is an error unless
    ``skip_bad`` (then they are dropped and counted in a warning)."""
    keep: List[int] = []
    bad: List[Tuple[str, str]] = []
    from ..progress import progress

    for i, path in enumerate(progress(paths, desc=f"checking {what}", leave=False, enabled=len(paths) >= 2000)):
        reason = check_readable(path)
        if reason is None:
            keep.append(i)
        elif not skip_bad:
            raise ErfLabError(f"{path}: cannot decode the image ({reason}); fix or remove it (erf, tsne and train skip such files with --skip-bad)")
        else:
            bad.append((path, reason))
    if bad:
        warnings.warn(f"erf-lab: skipped {len(bad)} undecodable image(s) in {what} (first: {bad[0][0]}: {bad[0][1]})")
    if not keep:
        raise ErfLabError(f"{what}: none of the {len(paths)} images could be decoded")
    return np.asarray(keep, dtype=np.int64)


def load_image(path: str, channels: int) -> Image.Image:
    """The decoded image in RGB (3 channels) or L (1 channel); one-line error if it fails."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB" if channels == 3 else "L")
    except FileNotFoundError:
        raise ErfLabError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ErfLabError(f"{path}: cannot decode the image ({reason}); fix or remove it (erf, tsne and train skip such files with --skip-bad)") from None


def to_tensor(image: Image.Image, size: Tuple[int, int]) -> Tensor:
    """Resize to ``size`` = (H, W) (bilinear; PIL antialiases when shrinking) -> FloatTensor[C, H, W] in [0, 1]."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
