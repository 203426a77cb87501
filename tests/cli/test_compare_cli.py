"""``erf-lab compare`` and ``erf-lab train --keep-every`` as a user runs them: a training trajectory
end to end, the exit codes, and bad inputs that fail in one line before any work."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cli

DATA = "digits-ms:size=32,renders=1"


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_trajectory_from_train_keep_every_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(["train", "--arch", "study_net", "--op", "dk", "--data", DATA, "--epochs", "3",
                           "--keep-every", "2", "--max-train-images", "48", "--max-eval-images", "16",
                           "--batch-size", "16", "--out", str(run / "best.pt"), "--no-progress"], capsys)
    assert code == 0, err
    kept = sorted(p.name for p in run.glob("epoch_*.pt"))
    assert kept == ["epoch_0.pt", "epoch_2.pt", "epoch_3.pt"]  # the start, every 2nd, the last
    last = torch.load(run / "best.last.pt", weights_only=True)
    final = torch.load(run / "epoch_3.pt", weights_only=True)
    assert final["epoch"] == 3 and "optimizer" not in final
    assert all(torch.equal(final["state_dict"][k], v) for k, v in last["state_dict"].items())

    out_dir = tmp_path / "cmp"
    code, out, err = _run(["compare", "--model", str(run / "epoch_*.pt"), "--layers", "stages", "--num-images", "4",
                           "--out", str(out_dir), "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads((out_dir / "compare.json").read_text())
    assert [m["epoch"] for m in doc["models"]] == [0, 2, 3] and doc["meta"]["axis"] == "epoch"
    assert [c["label"] for c in doc["columns"]] == ["stage 1", "stage 2", "stage 3", "stage 4"]
    for name in ("compare.png", "growth.png", "compare.csv", "compare.npz", "index.html"):
        assert (out_dir / name).stat().st_size > 0
    assert "epoch 3" in out and f"wrote {out_dir}" in out


def _static_program(path: Path) -> Path:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 32, 32),)), path)
    return path


def _one_error_line(err: str, text: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("erf-lab compare: error:") and text in lines[0], err


def test_bad_inputs_give_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--model", str(tmp_path / "nothing" / "epoch_*.pt")], "no file matches"),
        (["--model", "study:study_net-conv-s0", "--model", "study:mobilenet_v2-conv-s0", "--layer", "blocks.1"],
         "mobilenet_v2-conv-s0: the model has no layer named 'blocks.1'"),
        (["--model", str(_static_program(tmp_path / "fixed.pt2")), "--image-size", "32,48"],
         "takes 32x32 inputs only"),
        (["--model", "study:study_net-conv-s0", "--model", "study:study_net-dk-s0", "--name", "a"], "one name per model"),
    ]
    for args, text in cases:
        code, _, err = _run(["compare", *args, "--out", str(out), "--no-progress"], capsys)
        assert code == 2, (args, err)
        _one_error_line(err, text)
        assert not out.exists(), args  # nothing written, not even the folder
    with pytest.raises(SystemExit) as exc:  # argparse: usage, one error line, exit 2
        cli.main(["compare", "--model", "study:study_net-conv-s0", "--image-size", "0", "--out", str(out)])
    assert exc.value.code == 2 and "argument --image-size" in capsys.readouterr().err


def test_a_failing_model_is_one_line_and_exit_3(tmp_path, capsys):
    from erf_lab.study_models import resolve

    ck = torch.load(resolve("study:study_net-conv-s0"), weights_only=True)
    ck["state_dict"] = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    torch.save(ck, tmp_path / "broken.pt")
    out = tmp_path / "cmp"
    code, stdout, err = _run(["compare", "--model", "study:study_net-conv-s0", "--model", str(tmp_path / "broken.pt"),
                              "--layer", "blocks", "--num-images", "3", "--out", str(out), "--no-progress"], capsys)
    assert code == 3
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("erf-lab compare: broken at 64x64 failed:"), err
    assert "failed:" in stdout and (out / "compare.csv").is_file()
