"""Safe model loading: every accepted format, and every bad-input path gives one line (exit 2 in the CLI)
with no output files; a refused pickle's code never runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dk_ops import models
from erf_lab import load_model
from erf_lab.checkpoint import infer_input_channels
from erf_lab.errors import ErfLabError

ROOT = Path(__file__).resolve().parents[2]


def study(**kw):
    torch.manual_seed(0)
    return models.create("study_net", op="conv", num_classes=4, **kw)


def erf_lab_checkpoint(model, **extra):
    ckpt = {
        "format": "erf-lab-checkpoint",
        "version": 1,
        "arch": model.arch_name,
        "arch_kwargs": model.arch_kwargs,
        "state_dict": model.state_dict(),
        "data_spec": "noise",
        "class_names": ["a", "b", "c", "d"],
        "size_bin_edges": [0.0, 1.0],
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "input_size": [3, 40, 40],
        "metrics": {"acc": 0.5},
        "versions": {"torch": torch.__version__},
        "optimizer": {"state": {}, "param_groups": []},
    }
    ckpt.update(extra)
    return ckpt


class Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_erf_lab_checkpoint_roundtrip_with_metadata(tmp_path):
    m = study()
    torch.save(erf_lab_checkpoint(m), tmp_path / "c.pt")
    lm = load_model(tmp_path / "c.pt")
    assert lm.kind == "checkpoint" and same_weights(lm.model, m) and not lm.model.training
    assert lm.input_size == (3, 40, 40) and lm.meta["normalization"]["std"] == [0.25] * 3
    assert "state_dict" not in lm.meta and "optimizer" not in lm.meta and lm.meta["data_spec"] == "noise"


def test_plain_state_dict_needs_arch_and_strips_dataparallel_prefix(tmp_path):
    m = study()
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, tmp_path / "s.pt")
    with pytest.raises(ErfLabError, match=r"plain state_dict: pass arch \(--arch"):
        load_model(tmp_path / "s.pt")
    lm = load_model(tmp_path / "s.pt", arch="study_net", arch_kwargs={"num_classes": 4})
    assert lm.kind == "state_dict" and same_weights(lm.model, m)
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "w.pt")
    assert same_weights(load_model(tmp_path / "w.pt", arch="study_net", arch_kwargs={"num_classes": 4}).model, m)


def test_torchscript_and_export(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    x = torch.randn(1, 1, 8, 8)
    torch.jit.save(torch.jit.script(net), tmp_path / "m.ts")
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "m.pt2")
    for name, kind in (("m.ts", "torchscript"), ("m.pt2", "export")):
        lm = load_model(tmp_path / name)
        assert lm.kind == kind and torch.allclose(lm.model(x), net(x))
        assert lm.in_channels == 1
    assert infer_input_channels(net) == 1


def test_refused_pickle_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weights": torch.zeros(1), "payload": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ErfLabError, match="--trust-checkpoint") as info:
        load_model(tmp_path / "evil.pt")
    assert "runs any Python code" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # the oracle can fail: trusting the file does run the payload
    with pytest.raises(ErfLabError):
        load_model(tmp_path / "evil.pt", trust=True)
    assert marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 2, 3))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ErfLabError, match="refuses"):
        load_model(tmp_path / "whole.pt")
    lm = load_model(tmp_path / "whole.pt", trust=True)
    assert lm.kind == "pickle" and same_weights(lm.model, net)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["state_dict"].pop("fc.weight"), r"missing keys: fc\.weight"),
        (lambda c: c["state_dict"].__setitem__("extra.w", torch.zeros(1)), r"unexpected keys: extra\.w"),
        (lambda c: c["arch_kwargs"].__setitem__("num_classes", 7), r"shape mismatch.*fc\.weight \[4, \d+\] vs \[7, \d+\]"),
        (lambda c: c.__setitem__("arch", "no_such_net"), r"unknown arch 'no_such_net'.*study_net"),
        (lambda c: c.pop("arch"), r"no 'arch'"),
    ],
)
def test_bad_checkpoints(tmp_path, mutate, message):
    ckpt = erf_lab_checkpoint(study())
    mutate(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ErfLabError, match=message) as info:
        load_model(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


def test_corrupt_truncated_and_missing_files(tmp_path):
    torch.save(erf_lab_checkpoint(study()), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(os.urandom(2048))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name, pattern in (("trunc.pt", "corrupt or truncated"), ("junk.pt", "not a readable PyTorch file"),
                          ("empty.pt", "not a readable PyTorch file"), ("list.pt", "holds a list"),
                          ("nope.pt", "no such model file")):
        with pytest.raises(ErfLabError, match=pattern) as info:
            load_model(tmp_path / name)
        assert "\n" not in str(info.value), name


def test_missing_torchvision_and_timm_say_so(tmp_path, monkeypatch):
    torch.save(study().state_dict(), tmp_path / "s.pt")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ErfLabError, match="needs torchvision, which is not importable"):
        load_model(tmp_path / "s.pt", arch="torchvision:resnet50")
    with pytest.raises(ErfLabError, match="needs timm, which is not importable.*pip install timm"):
        load_model(tmp_path / "s.pt", arch="timm:resnet50")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_bad_inputs_exit_2_with_one_line_and_no_outputs(tmp_path, monkeypatch, capsys):
    import cli

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"payload": Evil(str(marker))}, tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save(study().state_dict(), tmp_path / "plain.pt")
    cases = [
        ["erf", "--model", "evil.pt", "--out", "o1"],
        ["erf", "--model", "junk.pt", "--out", "o2"],
        ["erf", "--model", "plain.pt", "--arch", "nope", "--out", "o3"],
        ["erf", "--model", "plain.pt", "--arch", "torchvision:resnet18", "--out", "o4"],
        ["erf", "--model", "missing.pt", "--out", "o5"],
        ["rf", "--model", "plain.pt", "--out", "o6"],
    ]
    monkeypatch.setitem(sys.modules, "torchvision", None)
    for args in cases:
        code = cli.main(list(args))
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"erf-lab {args[0]}: error: "), (args, err)
        assert "Traceback" not in err and not (tmp_path / args[-1]).exists()
    assert not marker.exists()
    # the real entry point, in its own process: same line, exit 2; --debug shows the traceback
    p = run_cli("erf", "--model", "evil.pt", "--out", "o7", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--trust-checkpoint" in p.stderr
    assert not marker.exists() and not (tmp_path / "o7").exists()
    p = run_cli("--debug", "erf", "--model", "junk.pt", cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr
