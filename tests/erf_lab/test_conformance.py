"""Conformance matrix: real torchvision, timm and zoo architectures in every checkpoint format,
through the CLI as a new user runs it (`erf`, `layers`, `rf`, `tsne` on noise images).

Every run must end in exit 0 with its files, or exit 2 with one line on stderr and no traceback,
never exit 1. The default layer must be the backbone's last spatial features with the right
grid; maps from TorchScript, torch.export and pickled modules must equal the state_dict map; and
the engine's map must equal an independent per-image loop written here (float64).

The matrix itself (`MATRIX`) is printed by `python -m pytest tests/erf_lab/test_conformance.py -s -k table`.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import cli
from erf_lab import compute_erf
from erf_lab.checkpoint import build_arch

# arch, image side, expected default layer, its grid, layout, prefix tokens, a named layer to try
MODELS = {
    "torchvision:resnet18": (224, "layer4", (7, 7), "nchw", 0, "layer3"),
    "torchvision:mobilenet_v3_small": (224, "features", (7, 7), "nchw", 0, "features.8"),
    "torchvision:efficientnet_b0": (224, "features", (7, 7), "nchw", 0, "features.5"),
    "torchvision:vit_b_16": (224, "encoder", (14, 14), "tokens", 1, "encoder.layers.encoder_layer_5"),
    "timm:convnext_atto": (224, "stages", (7, 7), "nchw", 0, "stages.2"),
    "timm:vit_tiny_patch16_224": (224, "norm", (14, 14), "tokens", 1, "blocks.5"),
    "timm:swin_tiny_patch4_window7_224": (224, "norm", (7, 7), "nhwc", 0, "layers.2"),
    "timm:resnet18d": (224, "layer4", (7, 7), "nchw", 0, "layer2"),
    "resnet50_dw": (64, "layer4", (8, 8), "nchw", 0, "layer3"),  # small_input: stride 8
    "mobilenet_v2": (64, "features", (2, 2), "nchw", 0, "features.10"),
}
# zoo models: with a DK operator, sized for 64 px
ZOO_KWARGS = {"resnet50_dw": {"op": "dk", "num_classes": 10, "small_input": True},
              "mobilenet_v2": {"op": "dk", "num_classes": 10, "width_mult": 0.5}}
# Formats per model: every model as a state_dict; the others for one model of each family (each
# export or script of a large model costs seconds, and the suite has 3 minutes).
FORMATS = {
    "state_dict": list(MODELS),
    "torchscript": ["torchvision:resnet18", "timm:vit_tiny_patch16_224", "resnet50_dw"],
    "export": ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:vit_tiny_patch16_224",
               "timm:convnext_atto", "resnet50_dw"],
    "pickle": ["torchvision:resnet18", "timm:swin_tiny_patch4_window7_224", "timm:resnet18d", "mobilenet_v2"],
}
MATRIX = {}  # (arch, format, command) -> "ok" or "exit 2: message"


def _build(arch):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_arch(arch, ZOO_KWARGS.get(arch))
    return m.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every (arch, format) file, written once for the module."""
    root = tmp_path_factory.mktemp("conformance")
    made = {}
    for fmt, archs in FORMATS.items():
        for arch in archs:
            side = MODELS[arch][0]
            model = _build(arch)
            path = root / f"{arch.replace(':', '_')}.{fmt}.{'pt2' if fmt == 'export' else 'pt'}"
            x = torch.randn(1, 3, side, side)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if fmt == "state_dict":
                    torch.save(model.state_dict(), path)
                elif fmt == "torchscript":
                    torch.jit.save(torch.jit.trace(model, x, check_trace=False), str(path))
                elif fmt == "export":
                    torch.export.save(torch.export.export(model, (x,)), str(path))
                else:
                    torch.save(model, path)
            made[arch, fmt] = path
    return made


def _run(argv, capsys):
    """cli.main in process: (exit code, stdout, stderr)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _record(arch, fmt, command, code, err):
    MATRIX[arch, fmt, command] = "ok" if code == 0 else f"exit {code}: {err.strip()}"


def _assert_clean(code, out, err, out_dir=None):
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("erf-lab "), err
        if out_dir is not None:
            assert not Path(out_dir).exists() or not any(Path(out_dir).iterdir())
    elif out_dir is not None:
        assert Path(out_dir).is_dir() and any(Path(out_dir).iterdir())


def _model_args(arch, fmt, files, tmp_path):
    """The CLI's model flags for one file. A zoo model's state_dict needs its constructor arguments
    (a DK operator, 10 classes), which --arch alone does not give: it goes as an erf-lab checkpoint."""
    path = files[arch, fmt]
    if fmt == "state_dict" and arch in ZOO_KWARGS:
        side = MODELS[arch][0]
        ckpt = {"format": "erf-lab-checkpoint", "arch": arch, "arch_kwargs": ZOO_KWARGS[arch],
                "state_dict": torch.load(path, weights_only=True), "input_size": [3, side, side]}
        path = tmp_path / f"{arch}.ckpt.pt"
        torch.save(ckpt, path)
        return ["--model", str(path)]
    args = ["--model", str(path)]
    if fmt == "state_dict":
        args += ["--arch", arch]
    if fmt == "pickle":
        args.append("--trust-checkpoint")
    return args


def _cases():
    for fmt, archs in FORMATS.items():
        for arch in archs:
            yield pytest.param(arch, fmt, id=f"{arch}-{fmt}")


def _erf(arch, fmt, files, tmp_path, capsys, layer=None, name="erf"):
    side = MODELS[arch][0]
    margs = _model_args(arch, fmt, files, tmp_path)
    out_dir = tmp_path / name
    argv = ["erf", *margs, "--data", "noise", "--num-images", "2", "--image-size", str(side), "--out", str(out_dir),
            "--no-progress"] + (["--layer", layer] if layer else [])
    code, out, err = _run(argv, capsys)
    _assert_clean(code, out, err, out_dir)
    return code, out, err, out_dir


@pytest.mark.parametrize("arch,fmt", list(_cases()))
def test_erf_default_layer(arch, fmt, files, tmp_path, capsys):
    side, layer, grid, layout, prefix, _ = MODELS[arch]
    code, out, err, out_dir = _erf(arch, fmt, files, tmp_path, capsys)
    _record(arch, fmt, "erf", code, err)
    if fmt == "torchscript":  # no hooks: only a model whose output is a map can be analysed
        assert code == 2 and "TorchScript" in err
        return
    assert code == 0, err
    meta = json.loads((out_dir / "erf.json").read_text())["meta"]
    assert meta["layer"] == layer and tuple(meta["grid"]) == grid
    assert meta["layout"] == layout and meta["prefix_tokens"] == prefix
    erf = np.load(out_dir / "erf.npz")["erf"]
    assert erf.shape == (side, side) and np.isfinite(erf).all() and erf.max() > 0
    if fmt != "state_dict":  # the same weights in another format: the same map
        _, _, _, ref_dir = _erf(arch, "state_dict", files, tmp_path, capsys, name="erf_ref")
        ref = np.load(ref_dir / "erf.npz")["erf"]
        assert np.abs(erf - ref).sum() / np.abs(ref).sum() < 1e-5


@pytest.mark.parametrize("arch,fmt", [c for c in _cases() if c.values[1] in ("state_dict", "export")])
def test_erf_named_layer(arch, fmt, files, tmp_path, capsys):
    named = MODELS[arch][5]
    code, out, err, out_dir = _erf(arch, fmt, files, tmp_path, capsys, layer=named)
    _record(arch, fmt, "erf --layer", code, err)
    assert code == 0, err
    meta = json.loads((out_dir / "erf.json").read_text())["meta"]
    assert meta["layer"] == named


@pytest.mark.parametrize("arch,fmt", list(_cases()))
def test_layers_and_rf(arch, fmt, files, tmp_path, capsys):
    side, layer = MODELS[arch][:2]
    margs = _model_args(arch, fmt, files, tmp_path)
    code, out, err = _run(["layers", *margs, "--image-size", str(side)], capsys)
    _record(arch, fmt, "layers", code, err)
    _assert_clean(code, out, err)
    if fmt != "torchscript":
        assert code == 0, err
        row = next(ln for ln in out.splitlines() if ln.split()[:1] == [layer])
        assert "*" in row.split()  # the default layer is marked
    rf_dir = tmp_path / "rf"
    code, out, err = _run(["rf", *margs, "--image-size", str(side), "--out", str(rf_dir)], capsys)
    _record(arch, fmt, "rf", code, err)
    _assert_clean(code, out, err, rf_dir)
    if code == 0:
        import pandas as pd

        df = pd.read_csv(rf_dir / "rf.csv")
        assert len(df) > 3  # not a single bogus row


@pytest.mark.parametrize("arch,fmt", [c for c in _cases() if c.values[1] in ("state_dict", "export", "pickle")])
def test_tsne(arch, fmt, files, tmp_path, capsys):
    side = MODELS[arch][0]
    margs = _model_args(arch, fmt, files, tmp_path)
    out_dir = tmp_path / "tsne"
    code, out, err = _run(["tsne", *margs, "--data", "noise", "--image-size", str(side), "--max-samples", "8",
                           "--perplexity", "2", "--iterations", "250", "--out", str(out_dir), "--no-progress",
                           "--jobs", "1"], capsys)
    _record(arch, fmt, "tsne", code, err)
    _assert_clean(code, out, err, out_dir)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert json.dumps(report).count(MODELS[arch][1]) >= 1  # the default layer was read


def _loop_erf(model, images, layer, unit, layout, prefix, grid_w):
    """Independent oracle: per image, relu(d sum(relu(y at the unit)) / dx) summed over colour, averaged."""
    module = dict(model.named_modules())[layer]
    maps = []
    for x in images:
        x = x[None].clone().requires_grad_(True)
        box = []
        h = module.register_forward_hook(lambda m, i, o: box.append(o))
        try:
            model(x)
        finally:
            h.remove()
        y = box[0]
        uy, ux = unit
        v = {"nchw": lambda: y[0, :, uy, ux], "nhwc": lambda: y[0, uy, ux, :],
             "tokens": lambda: y[0, prefix + uy * grid_w + ux, :]}[layout]()
        (g,) = torch.autograd.grad(torch.relu(v).sum(), x)
        maps.append(torch.relu(g[0]).sum(0))
    return torch.stack(maps).mean(0).numpy()


@pytest.mark.parametrize("arch", ["timm:vit_tiny_patch16_224", "timm:convnext_atto", "torchvision:resnet18"])
def test_engine_equals_a_per_image_loop(arch):
    side, layer, grid = MODELS[arch][:3]
    model = _build(arch).double()
    images = torch.randn(2, 3, side, side, dtype=torch.float64)
    r = compute_erf(model, images, progress=False)
    assert r.meta["layer"] == layer
    ref = _loop_erf(model, images, layer, tuple(r.meta["unit"]), r.meta["layout"], r.meta["prefix_tokens"], grid[1])
    assert np.abs(r.map - ref).sum() / np.abs(ref).sum() < 1e-5


class _Features(nn.Module):
    """The backbone of a model (``forward_features``, or torchvision's children before the pool)."""

    def __init__(self, model):
        super().__init__()
        self.m = model if hasattr(model, "forward_features") else nn.Sequential(*list(model.children())[:-2])

    def forward(self, x):
        return self.m.forward_features(x) if hasattr(self.m, "forward_features") else self.m(x)


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "timm:vit_tiny_patch16_224"])
def test_torchscript_backbone_map_equals_the_eager_default_layer(arch, files, tmp_path, capsys):
    """TorchScript is analysed at its output: a traced backbone gives the eager model's default-layer map."""
    side = MODELS[arch][0]
    path = tmp_path / "backbone.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(_Features(_build(arch)), torch.randn(1, 3, side, side), check_trace=False),
                       str(path))
    out_dir = tmp_path / "ts"
    code, out, err = _run(["erf", "--model", str(path), "--data", "noise", "--num-images", "2", "--image-size",
                           str(side), "--out", str(out_dir), "--no-progress"], capsys)
    _record(arch, "torchscript backbone", "erf", code, err)
    assert code == 0, err
    meta = json.loads((out_dir / "erf.json").read_text())["meta"]
    assert tuple(meta["grid"]) == MODELS[arch][2] and meta["prefix_tokens"] == MODELS[arch][4]
    _, _, _, ref_dir = _erf(arch, "state_dict", files, tmp_path, capsys, name="erf_ref")
    ref, got = np.load(ref_dir / "erf.npz")["erf"], np.load(out_dir / "erf.npz")["erf"]
    assert np.abs(got - ref).sum() / np.abs(ref).sum() < 1e-5


def test_zz_matrix_table(capsys):
    """Prints the matrix (model x format x command) of this run."""
    with capsys.disabled():
        for (arch, fmt, command), result in sorted(MATRIX.items()):
            print(f"| {arch} | {fmt} | {command} | {result[:110]} |")
