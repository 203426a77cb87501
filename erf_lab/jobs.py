"""One library function per ``erf-lab`` subcommand of the ERF section (``erf``, ``rf``, ``layers``).

The CLI parses flags and prints; these functions load, compute and write (atomically).
"""
import contextlib
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import distributed as _dist
from .checkpoint import LoadedModel, build_arch, load_model
from .errors import ErfLabError

__all__ = ["run_erf", "open_dataset", "rf_table", "layers_table", "model_for", "input_size_for", "output_folder"]

DEFAULT_IMAGE_SIZE = 224


def model_for(model_path: Optional[str], arch: Optional[str], trust: bool) -> LoadedModel:
    """A checkpoint (``model_path``) or, for ``rf``/``layers``, an untrained architecture."""
    if model_path:
        return load_model(model_path, arch=arch, trust=trust)
    if arch:
        return LoadedModel(build_arch(arch).eval(), {"arch": arch}, "arch", "")
    raise ErfLabError("give a model file (model_path, --model PATH) or, for an untrained architecture, "
                      "its name (arch, --arch NAME)")


def input_size_for(lm: LoadedModel, image_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int, int]:
    """(C, H, W) a command feeds the model: ``image_size`` if given, else the checkpoint's input size,
    the size a fixed-size model requires (:func:`erf_lab.layers.expected_input_size`), timm's
    ``pretrained_cfg["input_size"]``, else 224."""
    from .layers import expected_input_size

    c = lm.in_channels
    if image_size is not None:
        return (c,) + tuple(image_size)
    if lm.input_size is not None:
        return lm.input_size
    fixed = expected_input_size(lm.model)
    if fixed is not None:
        return (c,) + tuple(fixed)
    cfg = getattr(lm.model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return (c, int(size[1]), int(size[2]))
    return (c, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)


def _load_image(path: str, size: Tuple[int, int], channels: int, meta: Dict[str, Any]) -> Tuple[torch.Tensor, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise ErfLabError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    norm = meta.get("normalization") or {}
    if norm.get("mean") is not None and norm.get("std") is not None:
        mean = torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1)
        x = (x - mean) / std
    return x, arr


def open_dataset(spec: Optional[str], lm: LoadedModel, size, channels: int, num_images, seed: int,
                  skip_bad: bool = False):
    """(data set, note): the test split of ``spec`` (default: the checkpoint's data, else digits-ms);
    when that default cannot be opened, noise images with a note saying so."""
    from .data import open_data

    explicit = spec is not None
    spec = spec or lm.meta.get("data_spec") or "digits-ms"
    kwargs = dict(split="test", image_size=size, channels=channels, seed=seed, skip_bad=skip_bad)
    if spec == "noise":
        kwargs["num_images"] = num_images
    try:
        return open_data(spec, **kwargs), None
    except ErfLabError:
        if explicit:
            raise
        note = f"data set {spec!r} unavailable; used noise images"
        return open_data("noise", **dict(kwargs, num_images=num_images)), note


def run_erf(
    model: str,
    *,
    arch: Optional[str] = None,
    trust: bool = False,
    layer: Optional[str] = None,
    unit: Union[str, Sequence[int], Sequence[Sequence[int]]] = "center",
    preset: str = "replknet",
    data: Optional[str] = None,
    image: Optional[str] = None,
    num_images: Optional[int] = None,
    image_size: Union[int, Tuple[int, int], None] = None,
    batch_size: Union[int, str] = "auto",
    device: Optional[str] = None,
    seed: int = 0,
    out: str = "results/erf",
    progress: bool = True,
    skip_bad: bool = False,
    **options: Any,
):
    """``erf-lab erf``: load the model, compute its ERF, write ``out/erf.{npz,json,png}``.

    ``out`` is checked to be a writable folder before any work. Nothing is written unless the model
    loads and the ERF is computed. Under torchrun every rank computes its shard and rank 0 writes.
    Returns the :class:`~erf_lab.erf.ERFResult` (a list for several units).
    """
    with output_folder(out, check=_dist.is_main()):
        return _run_erf(model, arch, trust, layer, unit, preset, data, image, num_images, image_size, batch_size,
                        device, seed, out, progress, skip_bad, options)


@contextlib.contextmanager
def output_folder(out: Union[str, Path], check: bool = True):
    """Checks that ``out`` can be written (:func:`erf_lab.io.check_output_dir`) before the work in the
    block; when the block fails, a folder this call created is removed again if it is still empty."""
    from .io import check_output_dir

    created = check and not Path(out).exists()
    if check:
        check_output_dir(out)
    try:
        yield Path(out)
    except BaseException:
        if created:
            try:
                if Path(out).is_dir() and not any(Path(out).iterdir()):
                    Path(out).rmdir()
            except OSError:
                pass
        raise


def _run_erf(model, arch, trust, layer, unit, preset, data, image, num_images, image_size, batch_size, device, seed,
             out, progress, skip_bad, options):
    from .erf import check_memory, compute_erf, instance_erf

    from .device import resolve_device

    device = str(resolve_device(device))
    _dist.init_from_env(device)
    if _dist.is_active() and device == "cuda":
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    lm = load_model(model, arch=arch, trust=trust)
    size = (image_size, image_size) if isinstance(image_size, int) else (None if image_size is None else tuple(image_size))
    c, h, w = input_size_for(lm, size)
    check_memory(lm.model, (c, h, w), layer, device)  # before any image of that size exists
    common = dict(layer=layer, unit=unit, preset=preset, device=device, seed=seed, **options)
    ds, note = None, None
    if image is not None:
        x, display = _load_image(image, (h, w), c, lm.meta)
        result = instance_erf(lm.model, x, display_image=display, **common)
    else:
        ds, note = open_dataset(data, lm, (h, w) if (size or lm.input_size or data == "noise" or data is None) else None,
                           c, num_images, seed, skip_bad)
        result = compute_erf(lm.model, ds, num_images=num_images, batch_size=batch_size, progress=progress, **common)
    results = result if isinstance(result, list) else [result]
    for r in results:
        r.meta["model"] = {"path": lm.path, "kind": lm.kind, "arch": lm.meta.get("arch")}
        r.meta["data"] = image if image is not None else getattr(ds, "spec", data)
        if note:
            r.meta["data_note"] = note  # the CLI prints it
    if _dist.is_main():
        if len(results) == 1:
            results[0].save(out)
        else:
            for r in results:
                r.save(Path(out) / f"unit_{r.meta['unit'][0]}_{r.meta['unit'][1]}")
    _dist.barrier()
    return result


def rf_table(model: nn.Module, input_size: Sequence[int]):
    """``erf-lab rf``: the theoretical-RF DataFrame (:func:`erf_lab.rf.theoretical_rf`)."""
    from .rf import theoretical_rf

    return theoretical_rf(model, input_size)


def layers_table(model: nn.Module, input_size: Sequence[int]):
    """``erf-lab layers``: every named layer with its output shape, its grid on the image (layout
    and size, for spatial maps and token grids), the default layer of ``erf``/``tsne`` marked, and
    the theoretical RF size.

    Shapes come from forward hooks on one zero image (works for any eager model); RF sizes
    from :func:`erf_lab.rf.theoretical_rf` when the model can be traced (else empty).
    """
    import pandas as pd

    from .layers import hook_all
    from .layers import default_layer, spatial_grid

    shapes: Dict[str, Any] = {}
    grids: Dict[str, str] = {}
    named = [(n, m) for n, m in model.named_modules() if n]
    hw = (int(input_size[-2]), int(input_size[-1]))

    def record(name, mod, out):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        shapes.setdefault(name, tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else type(out).__name__)
        g = spatial_grid(t, hw, model) if name not in grids else None
        if g is not None:
            grids[name] = f"{g.grid[0]}x{g.grid[1]} {g.layout}" + (f" +{g.prefix}" if g.prefix else "")

    try:
        with hook_all(model, record), torch.no_grad():  # ScriptModules take no hooks: names and types only
            model(torch.zeros(1, *input_size))
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        raise ErfLabError(f"the model does not run on an input of size {list(input_size)}: {exc}".splitlines()[0]) from exc
    try:
        default = default_layer(model, torch.zeros(1, *input_size)).name
    except ErfLabError:
        default = None
    rf: Dict[str, Any] = {}
    try:
        df = rf_table(model, input_size)
        rf = {row["layer"]: row for row in df.to_dict("records")}
    except ErfLabError:
        pass
    rows = []
    for name, m in named:
        r = rf.get(name)
        rows.append({
            "layer": name,
            "type": _type_name(m),
            "output_shape": shapes.get(name, ""),
            "grid": grids.get(name, ""),
            "default": "*" if name == default else "",
            "rf_size": "" if r is None else (f"{r['rf_y']:g}x{r['rf_x']:g}" + (" global" if r["global"] else "")),
        })
    return pd.DataFrame(rows)


def _type_name(m: nn.Module) -> str:
    """The eager class name, also for a torch.export program's InterpreterModules (``type_name()``)."""
    name = m.type_name() if callable(getattr(m, "type_name", None)) else None
    return str(name).rsplit(".", 1)[-1] if name else type(m).__name__


