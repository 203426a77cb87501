"""Several layers' ERFs in one pass over the images (:func:`compute_layer_erfs`): the images are
loaded once per chunk, the model is prepared, traced and BatchNorm-folded once, each layer whose
unit sees only part of the image runs on its own verified crop, and the layers whose units see the
whole image share one forward (to the last of them) with one backward each (docs/design.md
section 3)."""
import contextlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ErfLabError
from ..layers import run_to_layers, static_batch
from ..progress import progress as progress_bar
from .compute import _device, _Run
from .engine import Engine, accumulate, prepared
from .geometry import check_input, geometry, model_channels, model_dtype
from .locality import CropPlan
from .memory import BatchSizer, images_that_fit, plan_layer
from .options import ERFOptions, Settings, resolve_options
from .result import ERFResult
from .sampling import Loader, Sampling, open_source

__all__ = ["compute_layer_erfs", "CHUNK_BYTES"]

#: Images loaded at once (all layers read them): at most this many bytes of them, beyond one batch.
CHUNK_BYTES = 256 * 2**20

SHARED = "off (the forward is shared with the other full-image layers)"


def compute_layer_erfs(
    model: nn.Module, data: Any, layers: Sequence[str], *, unit: Union[str, Sequence[int]] = "center",
    preset: Union[str, ERFOptions] = "replknet", num_images: Optional[int] = None, sampling: str = "random", seed: int = 0,
    batch_size: Union[int, str] = "auto", device: Union[str, torch.device, None] = None,
    image_size: Union[int, Tuple[int, int], None] = None, center: str = "rf", crop: Union[bool, str] = "auto",
    cone: bool = True, channels_last: Union[bool, str] = "auto", fold_bn: bool = True, share_forward: bool = True,
    progress: Any = True, **options: Any,
) -> List[ERFResult]:
    """The ERF of ``unit`` of each of ``layers`` on the same images: one :class:`ERFResult` per layer,
    in order, each equal (to float rounding) to ``compute_erf(model, data, layer=name, ...)``.

    The arguments are those of :func:`~erf_lab.erf.compute_erf` (``options``: :data:`OPTION_NAMES`
    overrides), with one unit per layer (``"center"`` or ``(y, x)``), the engine backend and
    one process. ``share_forward``: the layers computed on whole images share one forward
    (their cones are not pruned); False runs every layer on its own forward. ``progress``: a
    bar, or a progress bar object to advance by one per image and layer (a caller's bar
    over several calls). Each result's ``meta["seconds"]`` is the whole call's, and
    ``meta["shared_forward"]`` lists the layers that shared its forward (empty when it ran alone).
    """
    names = list(layers)
    if not names or len(set(names)) != len(names):
        raise ErfLabError(f"layers must be a non-empty list of distinct layer names, got {names!r}")
    opts = resolve_options(preset, **options)
    s = Settings(preset=preset if isinstance(preset, str) else "custom", unit=unit, num_images=num_images,
                 sampling=sampling, seed=seed, batch_size=batch_size, image_size=image_size, center=center, crop=crop,
                 cone=cone, channels_last=channels_last, fold_bn=fold_bn, progress=progress is not False,
                 distributed=False)
    if s.several_units:
        raise ErfLabError("compute_layer_erfs takes one unit per layer ('center' or (y, x)); "
                          "use compute_erfs for several units of one layer")
    t_start = time.perf_counter()
    source = open_source(data, s, model_channels(model))
    images = Sampling(source, s)
    dev = _device(model, device)
    load = Loader(source, s.image_size, model_dtype(model), dev)
    own_bar = isinstance(progress, bool)
    with prepared(model, dev, s.channels_last) as cl, contextlib.ExitStack() as restore:
        x_first = load(images.indices[:1])
        plan = _LayersPlan.make(model, names, x_first, s, opts, cl, dev, restore, share_forward)
        t_pass = time.perf_counter()
        bar = progress_bar(total=len(images.mine) * len(names), desc="ERF", unit="img",
                           enabled=progress) if own_bar else progress
        sums = plan.accumulate(load, images.mine, bar)
        if own_bar:
            bar.close()
    seconds = {"prepare": t_pass - t_start, "passes": time.perf_counter() - t_pass}
    out = []
    for run, (acc, counts) in zip(plan.runs, sums):
        r = run.results(acc[None], counts, s, opts, len(source), 1, dev, seconds)[0]
        r.meta["shared_forward"] = [x.engine.layer_name for x in plan.shared] if run in plan.shared else []
        out.append(r)
    return out


class _LayersPlan:
    """One :class:`~erf_lab.erf.compute._Run` per layer, on one traced graph and one BatchNorm
    folding; ``shared``: the runs on whole images that share a forward."""

    def __init__(self, model: nn.Module, runs: List[_Run], shared: List[_Run], channels_last: bool,
                 image_bytes: int) -> None:
        self.model, self.runs, self.shared, self.channels_last = model, runs, shared, channels_last
        self.solo = [r for r in runs if r not in shared]
        self.image_bytes = image_bytes

    @classmethod
    def make(cls, model: nn.Module, names: List[str], x_first: Tensor, s: Settings, opts: ERFOptions, cl: bool,
             dev: torch.device, restore: contextlib.ExitStack, share: bool) -> "_LayersPlan":
        """Checks the input, traces the model once, plans every layer (geometry, memory, crop) and
        folds BatchNorm once for all of them (undone by ``restore``)."""
        from ..rf import trace_rf

        hw = (int(x_first.shape[-2]), int(x_first.shape[-1]))
        fixed = check_input(model, x_first)
        try:
            traced: Any = trace_rf(model, tuple(x_first.shape[1:]))
        except ErfLabError as exc:  # each layer's geometry records why there is no theoretical RF
            traced = exc
        planned = []
        for name in names:
            layer, note, per_image = plan_layer(model, x_first, name, None)
            geo = geometry(model, layer, None, "auto", None, s.unit, x_first[0], traced=traced)
            planned.append((layer, note, per_image, geo))
        graph = None if isinstance(traced, ErfLabError) else traced
        n_folded = 0
        if s.fold_bn and graph is not None:
            from .fold import fold_batchnorm

            n_folded = restore.enter_context(fold_batchnorm(model, graph, names))
        one = static_batch(model)
        runs = []
        for layer, note, per_image, geo in planned:
            engine = Engine(model, layer, None, geo, opts, True)
            crop = CropPlan.choose(engine, s, hw, fixed, cl)
            sizer = BatchSizer(s.batch_size, dev, hw, images_that_fit(per_image, dev), one)
            runs.append(_Run(engine, crop, sizer, note, n_folded, cl, x_first.dtype, hw))
        shared = [r for r in runs if r.crop.window is None] if share else []
        if len(shared) < 2:
            shared = []
        for r in shared:
            r.crop.drop_cone(SHARED)
        return cls(model, runs, shared, cl, x_first[0].numel() * x_first.element_size())

    def _chunk(self) -> int:
        """Images loaded at once: the largest batch any layer runs, within :data:`CHUNK_BYTES`
        (at least the shared forward's batch)."""
        sizes = [r.batch_for(r.crop.window) for r in self.solo] + [self._shared_batch()]
        return max(1, self._shared_batch(), min(max(sizes), CHUNK_BYTES // max(1, self.image_bytes)))

    def _shared_batch(self) -> int:
        return min((r.batch_for(None) for r in self.shared), default=0)

    def accumulate(self, load: Loader, mine: Sequence[int], bar: Any) -> List[Tuple[Tensor, Tensor]]:
        """Per layer: the (H, W) float64 sum of the per-image maps and (used, skipped) counts."""
        sums: Dict[int, List[Tensor]] = {}
        pos = 0
        while pos < len(mine):
            x = load(mine[pos : pos + self._chunk()])
            ids = list(range(x.shape[0]))

            def from_chunk(sub: Sequence[int], window=None, x=x) -> Tensor:
                t = x[list(sub)]
                return t if window is None else t[:, :, window[0] : window[2], window[1] : window[3]]

            for r in self.solo:
                acc, counts, used = accumulate(r.engine, r.crop, from_chunk, ids, x[:1], False, r.batch_for, bar)
                r.batch_used = max(r.batch_used, used)
                self._add(sums, r, acc[0], counts)
            if self.shared:
                for r, acc, counts in self._shared_pass(x, bar):
                    self._add(sums, r, acc, counts)
            pos += x.shape[0]
        return [tuple(sums[id(r)]) for r in self.runs] if sums else \
            [(torch.zeros(self.runs[0].hw, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))] * len(self.runs)

    @staticmethod
    def _add(sums: Dict[int, List[Tensor]], run: _Run, acc: Tensor, counts: Tensor) -> None:
        if id(run) in sums:
            sums[id(run)][0] += acc
            sums[id(run)][1] += counts
        else:
            sums[id(run)] = [acc, counts]

    def _shared_pass(self, x: Tensor, bar: Any) -> List[Tuple[_Run, Tensor, Tensor]]:
        """The shared layers' sums over the chunk ``x``: per batch, one forward that ends when the last
        of them has run, then one backward per layer (the graph kept until the last)."""
        runs, device = self.shared, x.device
        acc = [torch.zeros(x.shape[-2:], dtype=torch.float64, device=device) for _ in runs]
        counts = [torch.zeros(2, dtype=torch.float64, device=device) for _ in runs]
        bs = self._shared_batch()
        for pos in range(0, x.shape[0], bs):
            xb = x[pos : pos + bs]
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            xr = xb.detach().requires_grad_(True)
            with torch.enable_grad():
                outs = run_to_layers(self.model, xr, [r.engine.layer for r in runs])
                for k, (r, out) in enumerate(zip(runs, outs)):
                    e = r.engine
                    v = e.unit_vectors(out, list(e.geo.units))
                    (g,) = torch.autograd.grad(e.reduce(v).sum(), xr, retain_graph=k < len(runs) - 1)
                    maps = e.per_image(g)  # (B, H, W)
                    ok = torch.isfinite(maps).flatten(1).all(1)
                    acc[k] += torch.where(ok.view(-1, 1, 1), maps, torch.zeros((), dtype=maps.dtype, device=device)).sum(0)
                    counts[k][0] += ok.sum()
                    counts[k][1] += (~ok).sum()
                    r.batch_used = max(r.batch_used, xb.shape[0])
                    bar.update(xb.shape[0])
            del outs
        return list(zip(runs, acc, counts))
