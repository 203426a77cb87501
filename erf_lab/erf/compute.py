"""The ERF computation, stage by stage: options and settings (:mod:`.options`), the images
(:mod:`.sampling`), the layer and units (:mod:`.geometry`), batch sizes and memory
(:mod:`.memory`), the crop plan (:mod:`.locality`) and the passes (:mod:`.engine`)."""
import contextlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import distributed as _dist  # the argument "distributed" is a flag
from ..errors import ErfLabError
from ..io import versions
from ..layers import static_batch
from ..progress import progress as progress_bar
from .engine import Engine, accumulate, prepared
from .geometry import Geometry, check_input, geometry, model_channels, model_dtype
from .locality import CropPlan
from .memory import BatchSizer, images_that_fit, plan_layer
from .options import UNSET, ERFOptions, Settings, resolve_options
from .result import ERFResult
from .sampling import Loader, Sampling, open_source

__all__ = ["compute_erf", "compute_erfs", "instance_erf"]


def compute_erf(
    model: nn.Module, data: Any, *,
    layer: Optional[str] = None, unit: Union[str, Sequence[int], Sequence[Sequence[int]]] = "center",
    preset: Union[str, ERFOptions] = "replknet", target_rectify: Optional[str] = UNSET,
    target_reduction: Optional[str] = UNSET, grad_rectify: Optional[str] = UNSET, color_reduction: Optional[str] = UNSET,
    map_rectify: Optional[str] = UNSET, normalize: Optional[str] = UNSET,
    output_index: Union[int, str, None] = None, layout: str = "auto", prefix_tokens: Optional[int] = None,
    num_images: Optional[int] = None, sampling: str = "random", seed: int = 0,
    batch_size: Union[int, str] = "auto", device: Union[str, torch.device, None] = None,
    image_size: Union[int, Tuple[int, int], None] = None, center: str = "rf", crop: Union[bool, str] = "auto",
    stop_at_layer: bool = True, cone: bool = True, channels_last: Union[bool, str] = "auto", fold_bn: bool = True,
    backend: str = "engine", progress: bool = True, distributed: Optional[bool] = None,
) -> Union[ERFResult, List[ERFResult]]:
    """Effective receptive field of ``unit`` of ``layer``, aggregated over ``data``.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W) images; run in eval mode (restored after).
        data: a Tensor[N, C, H, W] / Tensor[C, H, W], a Dataset of dicts with ``"image"``,
            of image tensors or of ``(image, label)`` tuples, or a data spec string
            (``"digits-ms"``, ``"noise"``, a folder...; :func:`erf_lab.data.open_data`, test split).
            Images are used as given (already normalised), resized with bicubic interpolation to
            ``image_size`` if set, in the dtype of the model's parameters (a float64 model gets
            float64 images).
        layer: a name from ``model.named_modules()``; None: the default layer of
            :func:`erf_lab.layers.default_layer` (the last spatial map or token grid of the backbone),
            chosen on a copy of the first image no longer than 256 px.
        unit: ``"center"`` (the cell whose theoretical RF is centred nearest the image centre),
            ``(y, x)``, or a list of such pairs (all in one pass; a list of results is returned).
        preset: ``"replknet"``, ``"luo"`` or ``"openerf"`` (:data:`PRESETS`), or an :class:`ERFOptions`;
            the other option arguments (:data:`OPTION_NAMES`) override single choices of it.
        output_index: element of a tuple/dict layer output.
        layout: ``"auto"`` (detected: :func:`erf_lab.layers.spatial_grid`), ``"nchw"``, ``"nhwc"`` or
            ``"tokens"``; ``prefix_tokens``: class/register tokens before the grid (the model's
            ``num_prefix_tokens``, else guessed, when None).
        num_images, sampling, seed: ``num_images`` images drawn with ``seed``, uniformly
            (``"random"``) or round-robin over labels (``"stratified"``).
        batch_size, device: images per backward pass (``"auto"``: :func:`auto_batch_size` for the
            computed image or crop size) and the device (default: the model's).
        center: ``"rf"`` (metrics centred on the unit's RF centre) or ``"array"`` (RepLKNet parity).
        crop: ``"auto"``: compute only a stride-aligned crop around the unit's field when the
            graph says the unit sees nothing else, verified on the first batch (one image's units
            must equal a plain forward on the crop framed by noise; see :mod:`erf_lab.erf.locality`), with
            the full image as the fallback; False: always the full image.
        stop_at_layer: end the forward at ``layer``.
        cone: with ``crop``, also crop intermediate maps that every path to ``layer`` passes
            through to the unit's cone (verified with the crop on the first batch; see :mod:`erf_lab.erf.cone`).
        channels_last: run in channels-last memory format (model and images; the model's format is
            restored afterwards). ``"auto"``: on CPU for models with 2-D convolutions whose
            parameters are not channels-last already (oneDNN's convolutions and their backward are
            faster there; the map differs only by float rounding).
        fold_bn: fold each eval-mode BatchNorm2d that follows a Conv2d into it for the run (the
            model is restored afterwards; the map differs only by float rounding; see
            :mod:`erf_lab.erf.fold` for the pairs left alone).
        backend: ``"engine"`` or ``"captum"`` (``captum.attr.NeuronGradient``, for cross-checking).
        progress: a progress bar on a terminal, one line when done otherwise (on rank 0; :mod:`erf_lab.progress`).
        distributed: shard images over a torch.distributed group and all-reduce (default: when
            a group is initialised, e.g. under torchrun).

    Returns:
        an :class:`ERFResult` (a list of them for several units).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        >>> r = compute_erf(net, torch.randn(4, 3, 16, 16), progress=False)
        >>> r.map.shape, r.n_images
        ((16, 16), 4)
    """
    opts = resolve_options(preset, target_rectify=target_rectify, target_reduction=target_reduction,
                           grad_rectify=grad_rectify, color_reduction=color_reduction, map_rectify=map_rectify,
                           normalize=normalize)
    s = Settings(preset=preset if isinstance(preset, str) else "custom", layer=layer, unit=unit,
                 output_index=output_index, layout=layout, prefix_tokens=prefix_tokens, num_images=num_images,
                 sampling=sampling, seed=seed, batch_size=batch_size, image_size=image_size, center=center, crop=crop,
                 stop_at_layer=stop_at_layer, cone=cone, channels_last=channels_last, fold_bn=fold_bn, backend=backend,
                 progress=progress, distributed=distributed)
    t_start = time.perf_counter()
    source = open_source(data, s, model_channels(model))
    images = Sampling(source, s)
    device = _device(model, device)
    load = Loader(source, s.image_size, model_dtype(model), device)
    with prepared(model, device, s.channels_last) as cl, contextlib.ExitStack() as restore:
        x_first = load(images.indices[:1])
        run = _Run.plan(model, x_first, s, opts, cl, device, restore)
        t_pass = time.perf_counter()
        bar = progress_bar(total=len(images.mine), desc="ERF", unit="img", enabled=s.progress and _dist.is_main())
        acc, counts, run.batch_used = accumulate(run.engine, run.crop, load, images.mine, x_first,
                                                 images.mine[:1] == images.indices[:1], run.batch_for, bar)
        bar.close()
        t_done = time.perf_counter()
        if images.sharded:
            _dist.all_reduce_sum(acc)
            _dist.all_reduce_sum(counts)
    seconds = {"prepare": t_pass - t_start, "passes": t_done - t_pass}
    results = run.results(acc, counts, s, opts, len(source), images.world_size, device, seconds)
    return results if s.several_units else results[0]


def _device(model: nn.Module, device: Union[str, torch.device, None]) -> torch.device:
    """``device``, or the device of the model's first parameter (CPU for a model without any)."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device)


class _Run:
    """What one call computes, decided on its first image: the layer, the geometry, the engine,
    the crop plan and the batch sizes, and the notes its results record."""

    def __init__(self, engine: Engine, crop: CropPlan, batch_for: BatchSizer, layer_note: str, n_folded: int,
                 channels_last: bool, dtype: torch.dtype, hw: Tuple[int, int]) -> None:
        self.engine, self.crop, self.batch_for = engine, crop, batch_for
        self.layer_note, self.n_folded, self.channels_last, self.dtype, self.hw = layer_note, n_folded, channels_last, dtype, hw
        self.batch_used = 0

    @classmethod
    def plan(cls, model: nn.Module, x_first: Tensor, s: Settings, opts: ERFOptions, channels_last: bool,
             device: torch.device, restore: contextlib.ExitStack) -> "_Run":
        """Checks the input, picks the layer (memory estimate included), traces the geometry, folds
        BatchNorm (undone by ``restore``) and chooses the crop plan."""
        hw = (int(x_first.shape[-2]), int(x_first.shape[-1]))
        fixed = check_input(model, x_first)
        layer, layer_note, per_image = plan_layer(model, x_first, s.layer, s.output_index)
        geo = geometry(model, layer, s.output_index, s.layout, s.prefix_tokens, s.unit, x_first[0])
        cap = images_that_fit(per_image, device)
        one_at_a_time = static_batch(model)  # a torch.export program with a static batch of 1
        if one_at_a_time and len(geo.units) > 1:
            raise ErfLabError("a torch.export program with a static batch of 1 takes one unit per run; "
                              "re-export it with a dynamic batch dimension for several units")
        n_folded = 0
        if s.engine and s.fold_bn:
            from .fold import fold_batchnorm

            n_folded = restore.enter_context(fold_batchnorm(model, geo.graph, layer))
        engine = Engine(model, layer, s.output_index, geo, opts, s.stop_at_layer)
        crop = CropPlan.choose(engine, s, hw, fixed, channels_last)
        batch_for = BatchSizer(s.batch_size, device, hw, cap, one_at_a_time)
        return cls(engine, crop, batch_for, layer_note, n_folded, channels_last, x_first.dtype, hw)

    def results(self, acc: Tensor, counts: Tensor, s: Settings, opts: ERFOptions, available: int, world_size: int,
                device: torch.device, seconds: Dict[str, float]) -> List[ERFResult]:
        """One :class:`ERFResult` per unit: the mean map and :meth:`meta`."""
        used, skipped = int(counts[0]), int(counts[1])
        if used == 0:
            raise ErfLabError(f"no image gave a finite map: all {skipped} gradients hold NaN or inf "
                              "(check the model's weights and the input normalisation)")
        mean = (acc / used).cpu().numpy()
        geo = self.engine.geo
        return [ERFResult(mean[k], used, skipped, self.meta(k, s, opts, available, world_size, device, seconds))
                for k in range(len(geo.units))]

    def meta(self, k: int, s: Settings, opts: ERFOptions, available: int, world_size: int, device: torch.device,
             seconds: Dict[str, float]) -> Dict[str, Any]:
        """Every option and decision behind unit ``k``'s map (the ``meta`` of its result)."""
        geo: Geometry = self.engine.geo
        (u, c), window = (geo.units[k], geo.centers[k]), self.crop.window
        return {
            "preset": s.preset, "options": dict(opts.__dict__), "layer": self.engine.layer_name or "",
            "layer_note": self.layer_note, "output_index": s.output_index, "layout": geo.layout,
            "grid": list(geo.grid), "prefix_tokens": geo.prefix, "unit": list(u), "rf_center": [c[0], c[1]],
            "rf_size": None if geo.rf_size is None else [geo.rf_size[0], geo.rf_size[1]],
            "rf_stride": list(geo.jump), "rf_note": geo.rf_note, "center_mode": s.center, "image_size": list(self.hw),
            "num_images_requested": s.num_images, "num_images_available": available, "sampling": s.sampling,
            "seed": s.seed, "batch_size": s.batch_size, "batch_size_used": self.batch_used, "device": str(device),
            "backend": s.backend, "crop": list(window) if window is not None else None,
            "locality": self.crop.locality, "cone": self.crop.cone_note, "channels_last": bool(self.channels_last),
            "bn_folded": self.n_folded, "dtype": str(self.dtype).replace("torch.", ""), "world_size": world_size,
            "versions": versions(),
            # preparation (default layer, geometry, BN folding) and the batched passes (incl. the check)
            "seconds": seconds,
        }


def compute_erfs(model: nn.Module, data: Any, units: Sequence[Sequence[int]], **kwargs: Any) -> List[ERFResult]:
    """The ERFs of several units ``[(y, x), ...]`` of one layer, in one pass over the images: always a
    list, one :class:`ERFResult` per unit in order (``kwargs``: those of :func:`compute_erf`)."""
    pairs = [tuple(int(v) for v in u) for u in units]
    if not pairs or any(len(u) != 2 for u in pairs):
        raise ErfLabError(f"units must be a non-empty list of (y, x) pairs, got {units!r}")
    return compute_erf(model, data, unit=pairs, **kwargs)


def instance_erf(model: nn.Module, image: Tensor, *, display_image: Optional[np.ndarray] = None, **kwargs) -> ERFResult:
    """ERF of one image (C, H, W); ``display_image`` (H x W x C in [0, 1]) is kept for the overlay."""
    r = compute_erf(model, image[None] if image.dim() == 3 else image, progress=False, **kwargs)
    r.image = display_image
    r.meta["instance"] = True
    return r
