"""What a new user meets first with real models and bad inputs: one line and exit 2 (never a
traceback, never a silent wrong answer), defaults that mean what the user means."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import cli
from erf_lab import compute_erf
from erf_lab.errors import ErfLabError

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    """conv stem, a strided stage, global pool and a classifier: the default layer is ``stage``."""

    def __init__(self, c_in=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_exit_2(code, out, err):
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def net_file(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path / "net.pt"
    torch.save(net, path)  # a whole-module pickle: loaded with --trust-checkpoint
    return net, path


def _erf_argv(path, out, *extra):
    return ["erf", "--model", str(path), "--trust-checkpoint", "--data", "noise", "--num-images", "3",
            "--image-size", "32", "--out", str(out), "--no-progress", *extra]


# ---- wrong answers with exit 0 ------------------------------------------------------------------

def test_vit_and_swin_default_layers_are_the_token_grid_and_the_nhwc_map():
    import timm

    from erf_lab.layers import default_layer

    vit = timm.create_model("vit_tiny_patch16_224").eval()
    d = default_layer(vit, torch.zeros(1, 3, 224, 224))
    assert (d.name, d.grid.layout, d.grid.grid, d.grid.prefix) == ("norm", "tokens", (14, 14), 1)
    swin = timm.create_model("swin_tiny_patch4_window7_224").eval()
    d = default_layer(swin, torch.zeros(1, 3, 224, 224))
    assert (d.name, d.grid.layout, d.grid.grid) == ("norm", "nhwc", (7, 7))


def test_attention_internals_are_not_spatial_grids():
    from erf_lab.layers import spatial_grid

    hw = (224, 224)
    assert spatial_grid(torch.zeros(1, 3, 197, 64), hw) is None  # (heads, tokens, head_dim)
    assert spatial_grid(torch.zeros(1, 7, 7, 768), hw).layout == "nhwc"
    assert spatial_grid(torch.zeros(1, 768, 7, 7), hw).layout == "nchw"
    g = spatial_grid(torch.zeros(1, 197, 192), hw)
    assert (g.layout, g.grid, g.prefix) == ("tokens", (14, 14), 1)
    g = spatial_grid(torch.zeros(1, 4 + 16 * 20, 8), (64, 80))  # 4 register tokens, a 16x20 grid
    assert (g.grid, g.prefix) == ((16, 20), 4)


def test_a_run_where_no_image_is_finite_is_an_error_and_writes_nothing(tmp_path, capsys):
    net = Net().eval()
    with torch.no_grad():
        net.stem[0].weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(net, path)
    out = tmp_path / "out"
    line = _one_line_exit_2(*_run(_erf_argv(path, out), capsys))
    assert "no image gave a finite map" in line
    assert not out.exists()


class Energy(nn.Module):
    """A dense map scaled by the image's mean energy: an inf pixel anywhere makes the gradient non-finite."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * (x ** 2).mean((1, 2, 3), keepdim=True)


def test_skipped_images_are_counted_on_stdout(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "energy.pt"
    torch.save(Energy().eval(), path)
    images = torch.randn(3, 3, 32, 32)
    images[1, 0, 5, 5] = float("inf")
    r = compute_erf(torch.load(path, weights_only=False), images, progress=False)
    assert (r.n_images, r.n_skipped) == (2, 1)
    import erf_lab.jobs as jobs

    monkeypatch.setattr(jobs, "open_dataset", lambda *a, **k: (list(images), None))
    code, out, err = _run(_erf_argv(path, tmp_path / "o"), capsys)
    assert code == 0, err
    assert "note: 1 of 3 images gave a non-finite map" in out


# ---- tracebacks -----------------------------------------------------------------------------------

def test_fixed_size_model_at_another_size_names_the_size_it_wants(tmp_path, capsys):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224").eval()
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    argv = ["erf", "--model", str(path), "--arch", "timm:vit_tiny_patch16_224", "--data", "noise", "--num-images", "1",
            "--out", str(tmp_path / "o"), "--no-progress"]
    line = _one_line_exit_2(*_run(argv + ["--image-size", "256"], capsys))
    assert "224x224" in line and "256x256" in line
    # a local layer of a fixed-size model: the crop it would take is refused by the model -> full image
    code, out, err = _run(argv + ["--layer", "patch_embed.proj"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "erf.json").read_text())["meta"]
    assert meta["crop"] is None and meta["image_size"] == [224, 224]


@pytest.mark.parametrize("kind", ["file", "devnull", "immutable"])
def test_unwritable_out_is_refused_before_any_work(kind, net_file, tmp_path, capsys, monkeypatch):
    _, path = net_file
    import erf_lab.jobs as jobs

    monkeypatch.setattr(jobs, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("x")
    elif kind == "devnull":
        out = Path("/dev/null")
    else:
        out = tmp_path / "ro"
        out.mkdir()
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.fail("chattr +i is needed for this test (e2fsprogs)")
    try:
        for command in (_erf_argv(path, out), ["rf", "--model", str(path), "--trust-checkpoint", "--out", str(out)]):
            line = _one_line_exit_2(*_run(command, capsys))
            assert str(out) in line
    finally:
        if kind == "immutable":
            subprocess.run(["chattr", "-i", str(out)])
    if kind == "file":
        assert out.read_text() == "x"


def test_an_image_size_that_cannot_fit_is_refused_before_allocating(net_file, tmp_path, capsys):
    _, path = net_file
    argv = _erf_argv(path, tmp_path / "o")
    argv[argv.index("--image-size") + 1] = "32768"
    line = _one_line_exit_2(*_run(argv, capsys))
    assert "GiB" in line and "smaller image size" in line
    assert not (tmp_path / "o").exists()


def test_nhwc_layout_on_a_token_layer_is_a_clear_error():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224").eval()
    with pytest.raises(ErfLabError, match=r"layout nhwc needs a 4-D layer output.*tokens") as exc:
        compute_erf(vit, torch.randn(1, 3, 224, 224), layer="blocks.0", layout="nhwc", progress=False)
    assert "\n" not in str(exc.value)


# ---- messages ---------------------------------------------------------------------------------------

class _System:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_pickle_that_calls_os_system_needs_trust_and_never_runs_without_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"weights": _System(f"touch {marker}")}, path)
    line = _one_line_exit_2(*_run(["layers", "--model", str(path)], capsys))
    assert "needs full unpickling" in line and "--trust-checkpoint" in line and "corrupt" not in line
    assert not marker.exists()


def test_compute_erf_accepts_a_data_spec_and_says_what_data_may_be():
    net = Net().eval()
    r = compute_erf(net, "noise", num_images=2, image_size=32, progress=False)
    assert r.n_images == 2 and r.map.shape == (32, 32)
    with pytest.raises(ErfLabError, match="data spec string"):
        compute_erf(net, 3.5, progress=False)


def test_grey_images_for_a_colour_model_are_one_line():
    with pytest.raises(ErfLabError, match=r"images have 1 channel\(s\) but the model's first layer takes 3") as exc:
        compute_erf(Net().eval(), torch.randn(2, 1, 32, 32), progress=False)
    assert "\n" not in str(exc.value)


def test_a_folder_as_model_and_an_unknown_arch(tmp_path, capsys):
    line = _one_line_exit_2(*_run(["layers", "--model", str(tmp_path)], capsys))
    assert "is a folder, not a model file" in line
    line = _one_line_exit_2(*_run(["layers", "--arch", "no_such_net"], capsys))
    assert line.count("study_net") == 1 and "torchvision:NAME" in line


def test_negative_units_count_from_the_end(net_file, tmp_path, capsys):
    _, path = net_file
    code, out, err = _run(_erf_argv(path, tmp_path / "o", "--unit", "-1,0"), capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "erf.json").read_text())["meta"]
    assert meta["unit"] == [15, 0]  # the 16x16 grid of ``stage``


def test_more_images_asked_than_the_data_holds_is_said_on_stdout(net_file, tmp_path, capsys):
    _, path = net_file
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    argv = ["erf", "--model", str(path), "--trust-checkpoint", "--data", str(folder), "--num-images", "10",
            "--image-size", "32", "--out", str(tmp_path / "o"), "--no-progress", "--skip-bad"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "note: 10 images asked for, the data holds 3: used all 3" in out


def test_interrupt_after_the_files_are_written_names_them(net_file, tmp_path, capsys, monkeypatch):
    _, path = net_file
    from erf_lab.erf import ERFResult

    real = ERFResult.save

    def save_then_interrupt(self, directory, **kw):
        d = real(self, directory, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ERFResult, "save", save_then_interrupt)
    code, out, err = _run(_erf_argv(path, tmp_path / "o"), capsys)
    assert code == 130
    assert "interrupted; already written:" in err and "erf.npz" in err and "erf.json" in err


def test_subprocess_cli_errors_have_no_traceback(tmp_path):
    """The installed entry point, as a shell user runs it."""
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "erf", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "is a folder" in res.stderr


def test_no_hook_survives_an_error_in_the_forward():
    from erf_lab.layers import hook_all

    net = Net().eval()
    seen = []

    def boom(name, mod, out):
        seen.append(name)
        if name == "stage":
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hook_all(net, boom):
            net(torch.zeros(1, 3, 8, 8))
    assert "stage" in seen
    assert all(not m._forward_hooks for m in net.modules())


def test_a_bug_is_not_a_user_error(tmp_path, monkeypatch):
    """Only ErfLabError is a user error (one line, exit 2); anything else propagates with its
    traceback (Python exits 1)."""
    import erf_lab.jobs as jobs

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(jobs, "run_erf", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["erf", "--model", "study:dk", "--out", str(tmp_path / "o"), "--no-progress"])


def test_cli_choices_are_the_librarys():
    from dk_ops.models import OPS
    from erf_lab.erf import OPTION_NAMES, PRESETS

    def choices(command: str) -> dict:
        sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest: a.choices for a in sub.choices[command]._actions if a.choices is not None}

    erf, train = choices("erf"), choices("train")
    assert list(erf["preset"]) == list(PRESETS) and list(train["op"]) == list(OPS)
    assert set(OPTION_NAMES) <= set(erf)
    with pytest.raises(SystemExit) as exc:  # a bad value is argparse's usage error: exit 2
        cli.main(["erf", "--model", "study:dk", "--unit", "1,2,3"])
    assert exc.value.code == 2
