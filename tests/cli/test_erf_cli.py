"""`erf-lab erf / rf / layers` end to end, and torchrun with 2 gloo processes == 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dk_ops import models

ROOT = Path(__file__).resolve().parents[2]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run(args, cwd, timeout=300):
    p = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = models.create("study_net", op="dk", num_classes=3, stem_stride=1)
    torch.save({"format": "erf-lab-checkpoint", "version": 1, "arch": "study_net", "arch_kwargs": m.arch_kwargs,
                "state_dict": m.state_dict(), "data_spec": "noise", "class_names": ["a", "b", "c"],
                "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "input_size": [3, 48, 48]}, d / "c.pt")
    return d / "c.pt"


def test_erf_command_writes_map_metrics_and_figure(ckpt, tmp_path):
    p = run([sys.executable, "-m", "cli", "erf", "--model", str(ckpt), "--layer", "blocks", "--data", "noise",
             "--num-images", "6", "--batch-size", "4", "--seed", "3", "--preset", "luo", "--out", "o", "--no-progress"],
            cwd=tmp_path)
    assert "unit (3, 3) of blocks" in p.stdout
    with np.load(tmp_path / "o" / "erf.npz") as z:
        m = z["erf"]
    assert m.dtype == np.float64 and m.shape == (48, 48)  # image-sized, from the checkpoint's input size
    doc = json.loads((tmp_path / "o" / "erf.json").read_text())
    meta = doc["meta"]
    assert meta["preset"] == "luo" and meta["options"]["grad_rectify"] is None and meta["layer"] == "blocks"
    assert meta["n_images"] == 6 and meta["n_skipped"] == 0 and meta["seed"] == 3 and meta["unit"] == [3, 3]
    assert meta["rf_center"] == [24.0, 24.0] and "torch" in meta["versions"] and meta["data"] == "noise"
    assert "sigma_y" in doc["metrics"] and "area_ratio_replknet@0.99" in doc["metrics"]
    assert (tmp_path / "o" / "erf.png").stat().st_size > 1000
    assert not [f for f in os.listdir(tmp_path / "o") if f.endswith(".tmp")]


def main_in_process(args, tmp_path, monkeypatch, capsys):
    import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_instance_erf_with_overlay(ckpt, tmp_path, monkeypatch, capsys):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (30, 40, 3))).astype(np.uint8)).save(tmp_path / "x.png")
    main_in_process(["erf", "--model", ckpt, "--layer", "blocks.1", "--image", "x.png", "--unit", "2,3", "--out", "inst"],
                    tmp_path, monkeypatch, capsys)
    assert sorted(os.listdir(tmp_path / "inst")) == ["erf.json", "erf.npz", "erf.png", "erf_overlay.png"]
    with np.load(tmp_path / "inst" / "erf.npz") as z:
        assert z["erf"].shape == (48, 48) and z["image"].shape == (48, 48, 3)
    assert json.loads((tmp_path / "inst" / "erf.json").read_text())["meta"]["unit"] == [2, 3]


def test_rf_and_layers_commands(ckpt, tmp_path, monkeypatch, capsys):
    out = main_in_process(["rf", "--arch", "resnet50_dw", "--image-size", "224", "--out", "r"], tmp_path, monkeypatch, capsys)
    df = pd.read_csv(tmp_path / "r" / "rf.csv")
    assert df.set_index("layer").loc["layer4", "rf_y"] == 427 and "layer4" in out
    out = main_in_process(["layers", "--model", ckpt], tmp_path, monkeypatch, capsys)
    line = next(l for l in out.splitlines() if l.split()[0] == "blocks")
    assert "(64, 6, 6)" in line and "45x45" in line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one(ckpt, tmp_path):
    common = ["erf", "--model", str(ckpt), "--layer", "blocks", "--data", "noise", "--num-images", "7",
              "--batch-size", "2", "--no-progress"]
    run([sys.executable, "-m", "cli", *common, "--out", "one"], cwd=tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "cli", *common, "--out", "two"], cwd=tmp_path, timeout=600)
    with np.load(tmp_path / "one" / "erf.npz") as a, np.load(tmp_path / "two" / "erf.npz") as b:
        np.testing.assert_allclose(b["erf"], a["erf"], rtol=1e-6, atol=1e-12)
    meta = json.loads((tmp_path / "two" / "erf.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["n_images"] == 7  # 4 + 3: no padding duplicates
