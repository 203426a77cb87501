"""The crop plan: whether the engine computes a stride-aligned crop around the units' fields (and
crops intermediate maps to the units' cone) instead of the whole image, how the first batch
verifies that choice, and the fall-backs when it does not hold.

The traced graph proposes the crop and the cone (docs/design.md section 3). The first batch
checks them before its backward: one image's raw channel vectors at the units, computed with
crop and cone inside the real batch, must equal a plain batch-1 forward on the crop framed by
strong noise (:func:`reference`). Global pooling, SE, GroupNorm, routing or attention change
them. On a mismatch the cone is dropped, then the crop, and the batch is recomputed; whole
images need no check.
"""
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import ErfLabError
from ..layers import run_to_layer, select_output
from .geometry import crop_window

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .options import Settings

__all__ = ["CropRefused", "CheckFailed", "agree", "reference", "CropPlan", "check_locality"]

Window = Tuple[int, int, int, int]

class CropRefused(Exception):
    """The model raised on a cropped input (e.g. a fixed input size): the crop cannot be used."""


class CheckFailed(Exception):
    """The first batch's units disagree with the plain reference: the crop or the cone is not exact."""


def agree(a: Tensor, ref: Tensor) -> bool:
    """Equal to float32 precision (relative to the larger magnitude), and finite."""
    if a.shape != ref.shape or not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(ref).all()):
        return False
    scale = max(float(a.abs().max()), float(ref.abs().max()))
    if scale == 0:  # all-zero vectors (a dead unit) verify nothing: do not accept them as a check
        return False
    return bool((a - ref).abs().max() <= 1e-4 * scale)


def reference(engine: "Engine", x0: Tensor, crop: Optional[Tuple[int, int, int, int]], seed: int,
               channels_last: bool = False) -> Optional[Tensor]:
    """The raw channel vectors at the units for image ``x0`` (C, H, W) from a plain forward (no crop
    hooks). Raw, not the rectified target: a unit whose relu'd target is 0 would verify nothing.

    With ``crop``: on a canvas one output stride larger than the crop on every side that fits in
    the image, its pixels outside the crop strong noise. A unit that reads only its field inside the
    crop gives the same value on the crop alone; global pooling, SE, GroupNorm statistics, routing or
    attention over the canvas change it. None when no side has room for such a margin.
    Without ``crop``: on the full image (the reference for cone pruning of the full image).
    One batch-1 forward either way; the compared value comes from the first real batch
    (:meth:`Engine.gradients` with ``check``), so verification costs no extra crop pass.
    """
    units = list(engine.geo.units)
    canvas = x0
    if crop is not None:
        ya, xa, yb, xb = crop
        h, w = x0.shape[-2:]
        jy, jx = (int(v) for v in engine.geo.jump)
        my, mx = max(jy, 8 // jy * jy), max(jx, 8 // jx * jx)
        pt, pb = (my if ya >= my else 0), (my if yb + my <= h else 0)
        pl, pr = (mx if xa >= mx else 0), (mx if xb + mx <= w else 0)
        if pt + pb + pl + pr == 0:
            return None
        g = torch.Generator().manual_seed(seed)
        canvas = x0[:, ya - pt : yb + pb, xa - pl : xb + pr].clone()
        noise = 3 * torch.randn(canvas.shape, generator=g).to(canvas)
        inside = torch.zeros(canvas.shape, dtype=torch.bool, device=canvas.device)
        inside[:, pt : pt + yb - ya, pl : pl + xb - xa] = True
        canvas = torch.where(inside, canvas, noise)
        units = [(u[0] - (ya - pt) // jy, u[1] - (xa - pl) // jx) for u in units]
    batch = canvas[None]
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        try:
            y = select_output(run_to_layer(engine.model, batch, engine.layer, stop=engine.stop), engine.output_index)
            return engine.unit_vectors(y.expand(len(units), *y.shape[1:]), units)  # sample u targets unit u
        except (IndexError, RuntimeError, ValueError, AssertionError, ErfLabError):  # e.g. a fixed input size
            return None


VERIFIED = "verified (graph, and the first image's units equal a plain forward on the crop framed by noise)"


class CropPlan:
    """Where the engine computes each batch: ``window`` (y0, x0, y1, x1, or None for whole
    images) and the engine's cone, with the notes the result's meta records (``locality``,
    ``cone``). Until the first batch has verified them (``verify``), batches come as whole
    images and :meth:`gradients` checks and falls back; afterwards batches come pre-cropped."""

    def __init__(self, engine: "Engine", window: Optional[Window], *, locality: str = "not needed",
                 cone_layers: Tuple = (), seed: int = 0, channels_last: bool = False, backend: str = "engine") -> None:
        self.engine, self.window, self.locality = engine, window, locality
        self.cone_layers = list(cone_layers)
        self.cone_note = "off"
        self.seed, self.channels_last, self.backend = seed, channels_last, backend
        self.verify = window is not None or engine.cone is not None
        self._refs: Dict[Optional[Window], Tuple[int, Optional[Tensor]]] = {}  # window -> (image, reference)

    @classmethod
    def choose(cls, engine: "Engine", settings: "Settings", hw: Tuple[int, int], fixed_size: bool,
               channels_last: bool) -> "CropPlan":
        """The plan the graph supports for ``settings`` (``crop``, ``cone``, ``backend``); a model
        that takes one input size only is never cropped."""
        geo = engine.geo
        crop = bool(settings.crop) and not fixed_size and settings.engine
        window, locality = None, "not needed" if settings.engine else "captum backend: full image"
        if crop and geo.layout == "nchw":
            window = crop_window(geo, hw)
            if window is None:
                locality = "field covers the image" if geo.local else \
                    "not provably local: " + (geo.rf_note or "graph has global or unbounded dependence")
        cone_layers: List = []
        if crop and settings.cone and geo.local and geo.graph is not None and settings.stop_at_layer:
            from .cone import ConeCrop, plan_cone

            cone_layers = plan_cone(geo.graph, engine.layer_name, engine.output_index, geo.rf)
            if cone_layers:
                engine.cone = ConeCrop(engine.model, cone_layers, geo.rf, geo.centers)
        return cls(engine, window, locality=locality, cone_layers=tuple(cone_layers), seed=settings.seed,
                   channels_last=channels_last, backend=settings.backend)

    def drop_cone(self, why: str) -> None:
        """Runs whole images without cone pruning (``why`` goes to the ``cone`` note): nothing left to verify."""
        if self.window is None:
            self.engine.cone, self.cone_layers, self.verify, self.cone_note = None, [], False, why

    @property
    def pre_cropped(self) -> bool:
        """Whether batches are loaded cropped to ``window`` (once it is verified)."""
        return not self.verify and self.window is not None

    def gradients(self, x_full: Tensor, batch_for: Callable[[Optional[Window]], int]) -> Tuple[Tensor, Tensor]:
        """The input gradients (B, U, C, h, w) of the batch ``x_full`` under the plan, and the batch
        they are of. Before verification ``x_full`` holds whole images: the plan is checked on
        them and, where it fails, narrowed (cone off, then whole images: the batch is cut to
        ``batch_for(None)``) and the batch recomputed."""
        engine = self.engine
        while True:
            engine.origin = (self.window[0], self.window[1]) if self.window is not None else (0, 0)
            x = x_full if self.window is None or self.pre_cropped else \
                x_full[:, :, self.window[0] : self.window[2], self.window[1] : self.window[3]]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            check = None
            if self.verify and (self.window is not None or engine.cone is not None):
                check = self._reference(x_full)
                if check[1] is None and self.window is not None:
                    x_full = self._whole_images(x_full, batch_for, "crop not verifiable (no room for a noise "
                                                "margin, or no finite image): full image")
                    continue
            try:
                g = engine.gradients(x, check) if self.backend == "engine" else engine.captum_gradients(x)
            except CropRefused:
                engine.cone, self.cone_note = None, "off (the model refused the crop)"
                x_full = self._whole_images(x_full, batch_for, "the model refused the crop: full image")
                continue
            except CheckFailed:
                if engine.cone is not None:  # the cone first: the crop alone may still be exact
                    engine.cone, self.cone_note = None, "cone check failed: off"
                else:
                    self.cone_note = "off (the locality check failed)" if self.cone_layers else self.cone_note
                    x_full = self._whole_images(x_full, batch_for, "empirical locality check failed: full image")
                continue
            if self.verify:
                self._verified()
            return g, x_full

    def _reference(self, x_full: Tensor) -> Tuple[int, Optional[Tensor]]:
        """(image, its reference) for the current window: the first finite image whose units are
        not all zero (at most 3 tried); the reference is None when none can be made."""
        key = tuple(self.window) if self.window is not None else None
        if key not in self._refs:
            self._refs[key] = (0, None)
            finite = (i for i in range(x_full.shape[0]) if bool(torch.isfinite(x_full[i]).all()))
            for _, i in zip(range(3), finite):
                ref = reference(self.engine, x_full[i], self.window, self.seed, self.channels_last)
                self._refs[key] = (i, ref)
                if ref is None or bool(ref.abs().max() > 0):
                    break
        return self._refs[key]

    def _whole_images(self, x_full: Tensor, batch_for: Callable[[Optional[Window]], int], why: str) -> Tensor:
        self.window, self.locality = None, why
        return x_full[: batch_for(None)]  # an auto batch of crops may be too large for whole images

    def _verified(self) -> None:
        self.verify = False
        if self.window is not None:
            self.locality = VERIFIED
        if self.engine.cone is not None:
            self.cone_note = f"{len(self.cone_layers)} layers cropped to the unit's cone (verified)"


def check_locality(engine: "Engine", x0: Tensor, crop: Window, seed: int = 0) -> bool:
    """Whether the engine's first-batch check accepts ``crop`` for image ``x0`` (C, H, W): the
    :class:`CropPlan` the engine runs, on a batch of that one image."""
    plan = CropPlan(engine, crop, seed=seed)
    plan.gradients(x0[None], lambda window: 1)
    return plan.window is not None
