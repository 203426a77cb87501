"""How much the engine may hold at once: the default batch per image size, the memory one image's
forward and backward needs (estimated on a small probe, never at the full size), the images that
fit in what the device has free, and the default layer chosen on the same probe."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ErfLabError, first_line
from ..layers import default_layer, get_layer, hook_all, probe_size, run_to_layer
from .geometry import model_dtype

__all__ = ["CPU_BATCH_PIXELS", "auto_batch_size", "check_memory", "plan_layer", "images_that_fit", "BatchSizer"]

# Pixels per batch on CPU: activations of about this many input pixels stay cache-friendly
# (ResNet-50-DW, 2 cores: 8 x 224^2 and 2 x 448^2 were the fastest, 1.5x faster than 32 x 224^2 and 8 x 448^2).
CPU_BATCH_PIXELS = 8 * 224 * 224


def auto_batch_size(device: Union[str, torch.device], hw: Tuple[int, int]) -> int:
    """The engine's default batch for images (or crops) of ``hw`` pixels: about
    :data:`CPU_BATCH_PIXELS` pixels per batch on CPU (1 to 64 images), 32 images elsewhere."""
    if torch.device(device).type != "cpu":
        return 32
    return int(min(64, max(1, CPU_BATCH_PIXELS // max(1, hw[0] * hw[1]))))


def _activation_bytes(model: nn.Module, x: Tensor, layer: Optional[str]) -> int:
    """Bytes of the distinct tensors that modules output in a forward up to ``layer`` for ``x``."""
    seen, total = set(), [0]

    def count(name, mod, out):
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                total[0] += t.numel() * t.element_size()

    with hook_all(model, count) as hooked:
        if not hooked:
            return 0
        with torch.no_grad():
            run_to_layer(model, x, get_layer(model, layer) if layer else None)
    return total[0]


def plan_layer(model: nn.Module, x_first: Tensor, layer: Optional[str], output_index) -> Tuple[Optional[str], str, int]:
    """(layer, how it was chosen, estimated bytes per image of a forward+backward at the full size).

    The default layer is chosen on a small copy of the image (:func:`erf_lab.layers.probe_size`), not
    at the user's size, and the same probe gives the memory estimate."""
    hw = tuple(x_first.shape[-2:])
    ph, pw = probe_size(model, hw)
    probe = x_first if (ph, pw) == hw else F.interpolate(x_first, size=(ph, pw), mode="bilinear", align_corners=False)
    note = ""
    try:
        if layer in (None, "") and output_index is None:
            chosen = default_layer(model, probe)
            layer, note = chosen.name, f"layer=None: {chosen.note}" if chosen.note else ""
        # images up to the probe's size fit anywhere: no estimate, no extra forward
        act = 0 if (ph, pw) == hw else _activation_bytes(model, probe, layer)
    except ErfLabError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model refused the input: one line, not its traceback
        raise ErfLabError(f"the model does not run on a {ph}x{pw} input ({first_line(exc)})") from exc
    if act == 0:
        return layer, note, 0
    scale = (hw[0] * hw[1]) / float(ph * pw)
    # forward activations kept for the backward, their gradients, and the input with its gradient
    return layer, note, int(2 * act * scale + 2 * x_first[0].numel() * x_first.element_size())


def check_memory(model: nn.Module, input_size: Sequence[int], layer: Optional[str] = None,
                 device: Union[str, torch.device, None] = None) -> int:
    """Estimated bytes of one image's forward and backward up to ``layer`` at ``input_size`` (C, H, W),
    from a forward on a small probe (no image of the full size is allocated). Raises a one-line
    :class:`ErfLabError` when that does not fit in the memory available on ``device``."""
    c, h, w = (int(v) for v in input_size)
    p = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    ph, pw = probe_size(model, (h, w))
    if (ph, pw) == (h, w):
        return 0
    dtype = model_dtype(model)
    probe = torch.zeros(1, c, ph, pw, dtype=dtype, device=p.device if p is not None else "cpu")
    try:
        if layer in (None, ""):
            layer = default_layer(model, probe).name
        act = _activation_bytes(model, probe, layer)
    except ErfLabError:
        raise
    except Exception:  # noqa: BLE001 - the model refuses the probe: the engine reports it on the real input
        return 0
    need = int(2 * act * (h * w) / float(ph * pw) + 2 * c * h * w * probe.element_size())
    images_that_fit(need, device)
    return need


def _available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def images_that_fit(per_image: int, device: torch.device) -> int:
    """How many images a batch may hold in the memory available (a one-line error when not even one)."""
    avail = _available_bytes(device)
    if avail is None or per_image <= 0:
        return 1 << 30
    if per_image > 0.8 * avail:
        raise ErfLabError(f"one image needs about {per_image / 2**30:.1f} GiB for the forward and backward, "
                          f"{avail / 2**30:.1f} GiB are available on {device}: use a smaller image size")
    return max(1, int(0.5 * avail // per_image))


class BatchSizer:
    """Images per backward pass for a crop window (None: whole images): ``batch_size`` when it is
    a number, else :func:`auto_batch_size` for the computed size capped by the memory that is free
    (``cap``: :func:`images_that_fit`); 1 for a model with a static batch of one."""

    def __init__(self, batch_size: Union[int, str], device: torch.device, hw: Tuple[int, int], cap: int,
                 one_at_a_time: bool) -> None:
        self.batch_size, self.device, self.hw, self.cap, self.one = batch_size, device, hw, cap, one_at_a_time

    def __call__(self, window: Optional[Tuple[int, int, int, int]]) -> int:
        if self.one:
            return 1
        if self.batch_size != "auto":
            return int(self.batch_size)
        size = (window[2] - window[0], window[3] - window[1]) if window is not None else self.hw
        return max(1, min(auto_batch_size(self.device, size), self.cap))
