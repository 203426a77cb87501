"""``erf_lab.compare``: ERFs of several models, layers and image sizes on the same seeded images.

Everything a user can get wrong is checked before any ERF is computed: the models load, every
named layer exists in every model, the image sizes suit every model, the stages agree in
number. Then each (model, size) runs one :func:`~erf_lab.erf.multilayer.compute_layer_erfs`
over all its layers under one progress bar; a job that fails is recorded and the others run.
"""
import contextlib
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..erf.geometry import model_dtype
from ..errors import ErfLabError, first_line
from ..io import versions
from .models import ModelEntry, resolve_models
from .result import ComparisonResult

__all__ = ["compare", "STAGES"]

STAGES = "stages"

Size = Tuple[int, int]


def _sizes(image_size: Union[None, int, Sequence[Any]], entries: List[ModelEntry], data: Any) -> List[Size]:
    """The image sizes: ``image_size`` (N, (H, W), or a list of them), else an image tensor's size,
    else the first model's input size."""
    from ..jobs import input_size_for

    if image_size is None:
        if isinstance(data, torch.Tensor) and data.dim() in (3, 4):
            return [(int(data.shape[-2]), int(data.shape[-1]))]
        return [tuple(input_size_for(entries[0].loaded)[1:])]
    items = [image_size] if isinstance(image_size, int) or (
        isinstance(image_size, tuple) and len(image_size) == 2 and all(isinstance(v, int) for v in image_size)) \
        else list(image_size)
    sizes = []
    for s in items:
        hw = (s, s) if isinstance(s, int) else tuple(int(v) for v in s)
        if len(hw) != 2 or min(hw) < 1:
            raise ErfLabError(f"image sizes must be positive N or (H, W), got {s!r} (--image-size)")
        sizes.append(hw)
    if len(set(sizes)) != len(sizes):
        raise ErfLabError(f"image sizes repeat: {sizes} (--image-size)")
    return sizes


def _check_models(entries: List[ModelEntry], sizes: List[Size]) -> int:
    """One channel count for all models, each size accepted by each fixed-size model; the channels."""
    from ..layers import check_input_size

    channels = {e.name: e.loaded.in_channels for e in entries}
    if len(set(channels.values())) > 1:
        raise ErfLabError(f"the models take different input channels ({channels}): compare models of one input")
    for e in entries:
        for hw in sizes:
            try:
                check_input_size(e.loaded.model, hw)
            except ErfLabError as exc:
                raise ErfLabError(f"{e.name}: {exc} (--image-size)") from None
    return next(iter(channels.values()))


def _layer_columns(entries: List[ModelEntry], layers: Union[None, str, Sequence[str]], size: Size,
                   channels: int) -> Tuple[List[str], List[List[str]]]:
    """(column labels, each model's layer per column). ``layers``: names, ``"stages"``, or None
    (each model's default layer)."""
    from ..layers import default_layer, get_layer, stage_layers

    if layers is None or layers == STAGES:
        per_model = []
        for e in entries:
            x = torch.zeros(1, channels, *size, dtype=model_dtype(e.loaded.model))
            try:
                chosen = stage_layers(e.loaded.model, x) if layers == STAGES else [default_layer(e.loaded.model, x)]
            except ErfLabError as exc:
                raise ErfLabError(f"{e.name}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - the model refused the input: one line
                raise ErfLabError(f"{e.name} does not run on a {size[0]}x{size[1]} input ({first_line(exc)})") from None
            per_model.append([c.name or "" for c in chosen])
        counts = {e.name: len(p) for e, p in zip(entries, per_model)}
        if len(set(counts.values())) > 1:
            raise ErfLabError(f"the models have different numbers of stages ({counts}): name the layers (--layer)")
        n = len(per_model[0])
        labels = [f"stage {k + 1}" for k in range(n)] if layers == STAGES else ["default layer"]
        return labels, per_model
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or len(set(names)) != len(names):
        raise ErfLabError(f"layers must be distinct layer names, got {names!r} (--layer)")
    for e in entries:
        for name in names:
            try:
                get_layer(e.loaded.model, name)
            except ErfLabError as exc:
                raise ErfLabError(f"{e.name}: {exc} (--layer)") from None
    return names, [list(names) for _ in entries]


def _open(data: Any, entries: List[ModelEntry], sizes: List[Size], channels: int, num_images: Optional[int],
          seed: int, skip_bad: bool) -> Tuple[Dict[Size, Any], Optional[str], str]:
    """The data set at each size (the same seeded images for every model), a note when the default
    data could not be opened, and the spec used. Images given as a tensor or a Dataset are used
    as they are (resized to each size by the engine)."""
    from ..jobs import open_dataset

    if data is not None and not isinstance(data, (str, Path)):
        return {hw: data for hw in sizes}, None, type(data).__name__
    out, note, spec = {}, None, data
    for hw in sizes:
        ds, note = open_dataset(data, entries[0].loaded, hw, channels, num_images, seed, skip_bad)
        out[hw] = ds
        spec = getattr(ds, "spec", data)
    return out, note, str(spec)


def compare(
    models: Sequence[Any], *, names: Optional[Sequence[str]] = None, layers: Union[None, str, Sequence[str]] = None,
    image_size: Union[None, int, Sequence[Any]] = None, data: Any = None, num_images: Optional[int] = 50,
    preset: str = "replknet", seed: int = 0, device: Optional[str] = None, batch_size: Union[int, str] = "auto",
    arch: Optional[str] = None, trust: bool = False, axis: str = "auto", skip_bad: bool = False, progress: bool = True,
    out: Optional[str] = None, **options: Any,
) -> ComparisonResult:
    """ERFs of every (model, layer, image size) on the same seeded images.

    Args:
        models: model files (erf-lab checkpoints, state_dicts with ``arch``, TorchScript, .pt2,
            ``study:NAME``), globs of epoch checkpoints (``"run/epoch_*.pt"``: sorted by the epoch each
            file records, a training trajectory), and ``untrained:SPEC`` (SPEC's architecture with
            fresh weights seeded by ``seed``).
        names: one display name per entry of ``models`` (default: the file stem).
        layers: layer names (the same in every model), ``"stages"`` (each stage's output,
            :func:`erf_lab.layers.stage_layers`), or None (each model's default layer).
        image_size: N, (H, W) or a list of them (one column per layer and size); default the first
            model's input size.
        data, num_images, seed: the images (a data spec, default the first model's data, else
            digits-ms; or an image tensor / Dataset), how many, and the seed that draws them (the
            same images for every model).
        preset, options: the ERF protocol (:data:`erf_lab.erf.PRESETS`, :data:`OPTION_NAMES` overrides).
        device, batch_size: where and how many images per backward pass (:func:`~erf_lab.erf.compute_erf`).
        arch, trust: for plain state_dicts and pickled checkpoints (:func:`erf_lab.load_model`).
        axis: the growth curve's x axis: ``"depth"``, ``"epoch"``, or ``"auto"`` (epoch for one
            glob of epoch checkpoints, else depth).
        progress: one progress bar over all (model, layer, size) jobs.
        out: a folder to :meth:`~ComparisonResult.save` into (checked before any work).

    Returns:
        a :class:`ComparisonResult` (``failures`` lists the jobs that failed; the others ran).

    Raises:
        ErfLabError: a bad input (before any ERF is computed), or every job failed.
    """
    from ..device import resolve_device
    from ..erf.options import resolve_options
    from ..jobs import output_folder

    t0 = time.perf_counter()
    if axis not in ("auto", "depth", "epoch"):
        raise ErfLabError(f"axis must be 'auto', 'depth' or 'epoch', got {axis!r}")
    opts = resolve_options(preset, **options)  # a bad preset or option fails before any model loads
    dev = str(resolve_device(device))
    with output_folder(out) if out is not None else contextlib.nullcontext():
        entries = resolve_models(models, names, arch=arch, trust=trust, seed=seed)
        sizes = _sizes(image_size, entries, data)
        channels = _check_models(entries, sizes)
        labels, per_model = _layer_columns(entries, layers, sizes[0], channels)
        if axis == "epoch" and any(e.epoch is None for e in entries):
            raise ErfLabError("axis 'epoch' needs models whose files record an epoch")
        datasets, note, spec = _open(data, entries, sizes, channels, num_images, seed, skip_bad)
        result = _run(entries, labels, per_model, sizes, datasets, dict(
            preset=preset, num_images=num_images, seed=seed, batch_size=batch_size, device=dev, **options), progress)
        if not result.cells:
            first = result.failures[0]
            raise ErfLabError(f"every job failed, nothing written; {first['model']} at {first['image_size'][0]}x"
                              f"{first['image_size'][1]}: {first['error']}")
        trajectory = len(models) == 1 and len(entries) > 1 and all(e.epoch is not None for e in entries)
        result.meta.update({
            "preset": preset if isinstance(preset, str) else "custom", "options": dict(opts.__dict__), "data": spec,
            "data_note": note, "num_images": num_images, "seed": seed, "device": dev,
            "axis": axis if axis != "auto" else ("epoch" if trajectory else "depth"),
            "layers": layers if isinstance(layers, (str, type(None))) else list(layers),
            "image_sizes": [list(s) for s in sizes], "versions": versions(), "seconds": time.perf_counter() - t0})
        if out is not None:
            result.save(out)
    return result


def _run(entries: List[ModelEntry], labels: List[str], per_model: List[List[str]], sizes: List[Size],
         datasets: Dict[Size, Any], kwargs: Dict[str, Any], progress: bool) -> ComparisonResult:
    """Every (model, size) job under one bar; a failing job is recorded, the others go on."""
    from ..erf.multilayer import compute_layer_erfs
    from ..layers import spatial_depth
    from ..progress import progress as progress_bar

    columns = [{"label": lab if len(sizes) == 1 else f"{lab} @ {h}x{w}", "slot": k, "layer": lab,
                "image_size": [h, w]} for (h, w) in sizes for k, lab in enumerate(labels)]
    result = ComparisonResult([dict(e.describe(), layers=per_model[i]) for i, e in enumerate(entries)], columns)
    n_img = {hw: min(len(ds), kwargs["num_images"]) if kwargs["num_images"] else len(ds) for hw, ds in datasets.items()}
    total = sum(n_img[hw] * len(labels) for hw in sizes) * len(entries)
    bar = progress_bar(total=total, desc="compare", unit="img", enabled=progress)
    try:
        for i, e in enumerate(entries):
            for hw in sizes:
                cols = [j for j, c in enumerate(columns) if tuple(c["image_size"]) == hw]
                before = getattr(bar, "n", None)
                try:
                    rs = compute_layer_erfs(e.loaded.model, datasets[hw], per_model[i], image_size=hw, progress=bar,
                                            **kwargs)
                    p = next(iter(e.loaded.model.parameters()), None)  # the engine left the model on its device
                    x = torch.zeros(1, e.loaded.in_channels, *hw, dtype=model_dtype(e.loaded.model),
                                    device=p.device if p is not None else "cpu")
                    depth = spatial_depth(e.loaded.model, x, per_model[i])
                except (ErfLabError, RuntimeError, ValueError, AssertionError) as exc:  # the model's own failure
                    msg = str(exc).strip().splitlines()[0] if isinstance(exc, ErfLabError) else first_line(exc)
                    result.failures.append({"model": e.name, "image_size": list(hw), "error": msg})
                    done = (bar.n - before) if before is not None else 0
                    bar.update(n_img[hw] * len(labels) - done)
                    continue
                for j, r in zip(cols, rs):
                    r.meta["model"] = e.describe()
                    result.cells[(i, j)] = r
                    result.depth[(i, j)] = depth[per_model[i][columns[j]["slot"]]]
    finally:
        bar.close()
    return result
