"""erf_lab.train and `erf-lab train`: smoke runs per op, checkpoint round trip, exact resume,
atomic writes, held-out splits for sources without splits, errors."""
import contextlib
import os
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from dk_ops import models
from erf_lab.checkpoint import load_model
from erf_lab.data import open_data
from erf_lab.errors import ErfLabError
import erf_lab.train as erf_train
from erf_lab.train import companion_paths, evaluate, train, training_splits

DATA = "digits-ms:size=32,renders=1"
TINY = {"widths": (8, 16), "depth": 1, "stem_width": 8}  # study_net, small enough for CI
QUICK = dict(arch_kwargs=TINY, max_train_images=64, max_eval_images=32, batch_size=16, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _cache_and_threads(tmp_path_factory):
    """A data cache shared by the session; one thread: these tensors are tiny, and on a busy
    2-core machine two OpenMP threads made these runs several times slower, not faster."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ERF_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "erf-lab-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("op", models.OPS)
def test_one_epoch_per_op_and_checkpoint_round_trip(op, tmp_path):
    out = tmp_path / "ck.pt"
    m = train("study_net", op, DATA, 1, out, seed=1, **QUICK)
    paths = companion_paths(out)
    assert all(p.is_file() for p in paths.values())
    ck = _state(out)  # plain types and tensors only
    assert ck["format"] == "erf-lab-checkpoint" and ck["version"] == 1 and ck["epoch"] == 1
    assert ck["arch"] == "study_net" and ck["arch_kwargs"]["op"] == op and ck["arch_kwargs"]["num_classes"] == 10
    assert ck["data_spec"] == DATA and ck["class_names"] == [str(d) for d in range(10)]
    assert ck["input_size"] == [3, 32, 32] and len(ck["size_bin_edges"]) == 11
    assert set(ck["versions"]) == {"erf_lab", "torch", "numpy", "python"}
    assert len(m["history"]) == 1 and 0.0 <= m["test_acc"] <= 1.0 and np.isfinite(m["test_loss"])
    assert ck["metrics"]["test_acc"] == m["test_acc"]
    assert json.loads(paths["metrics"].read_text())["test_acc"] == m["test_acc"]
    assert {"optimizer", "scheduler", "rng"} <= set(_state(paths["last"]))

    # rebuild from the dict alone: the same test loss and accuracy as recorded by training
    model = models.create(ck["arch"], **ck["arch_kwargs"])
    model.load_state_dict(ck["state_dict"])
    test_subset = training_splits(DATA, seed=1, max_train=64, max_eval=32)[1]["test"]
    test, idx = test_subset.dataset, test_subset.indices
    assert len(idx) == 32 and max(idx) < len(open_data(DATA, split="test"))
    again = evaluate(model, test_subset, progress=False)
    assert again["acc"] == m["test_acc"] and again["loss"] == pytest.approx(m["test_loss"], rel=1e-5)
    # and through the ERF engine's loader, with the data normalisation recorded
    loaded = load_model(out)
    x = torch.stack([test[i]["image"] for i in idx[:4]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-6)
    assert loaded.meta["normalization"] == {"mean": list(test.mean), "std": list(test.std)}


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full = train("study_net", "dk", DATA, 2, tmp_path / "full.pt", seed=3, **QUICK)
    # the same run, interrupted during epoch 2 (after its training steps, before anything is saved)
    calls = []

    def interrupted_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(erf_train, "evaluate", interrupted_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train("study_net", "dk", DATA, 2, tmp_path / "part.pt", seed=3, **QUICK)
    monkeypatch.setattr(erf_train, "evaluate", evaluate)
    assert _state(tmp_path / "part.last.pt")["epoch"] == 1
    resumed = train("study_net", "dk", DATA, 2, tmp_path / "part.pt", seed=3, resume=True, **QUICK)
    a, b = _state(tmp_path / "full.last.pt"), _state(tmp_path / "part.last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(t, b["optimizer"]["state"][k][n]) for n, t in v.items())
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]
    assert resumed["test_acc"] == full["test_acc"]
    # the comparison can fail: another seed gives other weights
    train("study_net", "dk", DATA, 1, tmp_path / "other.pt", seed=4, **QUICK)
    c = _state(tmp_path / "other.last.pt")
    assert not torch.equal(c["state_dict"]["fc.weight"], b["state_dict"]["fc.weight"])


def test_size_curriculum_schedule_and_errors(tmp_path):
    """Epoch 0 and epochs after the curriculum use the full range; epochs 1..E fall
    log-linearly from CURRICULUM_START; a source without fresh renders is refused."""
    from erf_lab.data.digits_ms import SIZE_RANGE

    floors = [erf_train.size_floor(e, 4) for e in range(7)]
    assert floors[0] == floors[5] == floors[6] == SIZE_RANGE[0]
    assert floors[1] == pytest.approx(erf_train.CURRICULUM_START)
    ratios = [floors[e + 1] / floors[e] for e in range(1, 4)]
    assert ratios == pytest.approx([(SIZE_RANGE[0] / erf_train.CURRICULUM_START) ** 0.25] * 3)
    assert erf_train.size_floor(3, 0) == SIZE_RANGE[0]
    assert [erf_train.auto_curriculum_epochs(e) for e in (1, 2, 5, 10, 24, 47, 100)] == [0, 0, 1, 2, 4, 6, 6]
    m = train("study_net", "conv", DATA, 2, tmp_path / "c.pt", size_curriculum_epochs=3, **QUICK)
    assert _state(tmp_path / "c.pt")["train_args"]["size_curriculum_epochs"] == 3
    train("study_net", "conv", DATA, 12, tmp_path / "f.pt", **dict(QUICK, max_train_images=16, max_eval_images=8))
    assert _state(tmp_path / "f.pt")["train_args"]["size_curriculum_epochs"] == 0  # auto: only for nets that ask
    assert models.train_hints("mobilenet_v2")["size_curriculum"]
    assert len(m["history"]) == 2
    with pytest.raises(ErfLabError, match="fresh digits-ms"):
        train("study_net", "conv", DATA + ",fresh=0", 1, tmp_path / "d.pt", size_curriculum_epochs=2, **QUICK)
    with pytest.raises(ErfLabError, match="size_curriculum_epochs"):
        train("study_net", "conv", DATA, 1, tmp_path / "e.pt", size_curriculum_epochs=-1, **QUICK)


def test_loader_worker_renders_the_same_run(tmp_path):
    """Fresh digits-ms renders made in a DataLoader worker are seeded by
    (seed, epoch, item) like those made in the training process: the weights are identical."""
    assert open_data(DATA, split="train").renders_on_the_fly
    assert not open_data(DATA + ",fresh=0", split="train").renders_on_the_fly
    a = train("study_net", "conv", DATA, 2, tmp_path / "a.pt", seed=3, num_workers=0, **QUICK)
    b = train("study_net", "conv", DATA, 2, tmp_path / "b.pt", seed=3, num_workers=1, **QUICK)
    sa, sb = _state(tmp_path / "a.last.pt")["state_dict"], _state(tmp_path / "b.last.pt")["state_dict"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert a["test_acc"] == b["test_acc"]
    with pytest.raises(ErfLabError, match="num_workers"):
        train("study_net", "conv", DATA, 1, tmp_path / "c.pt", num_workers=-1, **QUICK)


@pytest.mark.parametrize("op", ["conv", "dk_dcn", "condconv"])
def test_channels_last_training_matches_the_default_format(op, tmp_path):
    """The CPU default trains channels-last; the weights after a few steps equal those of a
    default-format run up to float rounding, and checkpoints hold contiguous tensors. (SGD:
    Adam's first steps turn rounding-level differences of near-zero gradients into lr-sized ones.)"""
    kw = dict(QUICK, max_train_images=32, optimizer="sgd")
    a = train("study_net", op, DATA, 1, tmp_path / "a.pt", seed=5, channels_last=False, **kw)
    b = train("study_net", op, DATA, 1, tmp_path / "b.pt", seed=5, **kw)
    ca, cb = _state(tmp_path / "a.last.pt"), _state(tmp_path / "b.last.pt")
    assert (ca["train_args"]["channels_last"], cb["train_args"]["channels_last"]) == (False, True)
    sa, sb = ca["state_dict"], cb["state_dict"]
    assert all(v.is_contiguous() for v in sb.values())
    for k, v in sa.items():
        if v.is_floating_point():
            torch.testing.assert_close(sb[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert abs(a["history"][0]["train_loss"] - b["history"][0]["train_loss"]) < 1e-5
    if op == "condconv":  # the 5-D expert bank is left as it was, and saved contiguous like the rest
        assert any(v.dim() == 5 for v in sb.values())
    with pytest.raises(ErfLabError, match="channels_last must be"):
        train("study_net", "conv", DATA, 1, tmp_path / "e.pt", channels_last="yes", **kw)


@pytest.mark.parametrize("op, mult, expected", [
    ("dk", "auto", {"kernel_offset_generator": 0.1}),
    ("dcn", "auto", {"offset_generator": 0.03}),
    ("dk_dcn", "auto", {"kernel_offset_generator": 0.1, "offset_generator": 0.03}),
    ("dk_dcn", 0.2, {"kernel_offset_generator": 0.2, "offset_generator": 0.2}),
])
def test_offset_generators_learn_at_a_fraction_of_the_rate(op, mult, expected, tmp_path):
    """Every parameter sits in the group of its kind's rate (DK kernel offsets 0.1x, DCN
    sampling offsets 0.03x by default), counted through the optimizer state's shapes."""
    train("study_net", op, DATA, 1, tmp_path / "ck.pt", seed=0, lr=1e-3, offset_lr_mult=mult, **QUICK)
    opt = _state(tmp_path / "ck.last.pt")["optimizer"]
    model = models.create("study_net", op=op, num_classes=10, **TINY)

    def kind(name):
        return "kernel_offset_generator" if "kernel_offset_generator" in name else (
            "offset_generator" if "offset_generator" in name else None)

    want = {}
    for n, p in model.named_parameters():
        lr = round(1e-3 * expected.get(kind(n), 1.0), 12)
        want[lr] = want.get(lr, 0) + p.numel()
    assert len(want) == len(set(expected.values())) + 1
    # optimizer state indexes parameters in group order; their moments have the parameters' shapes
    numel = {}
    for group in opt["param_groups"]:
        for i in group["params"]:
            lr = round(group["initial_lr"], 12)
            numel[lr] = numel.get(lr, 0) + opt["state"][i]["exp_avg"].numel()
    assert numel == want


@pytest.mark.parametrize("mult, inside", [(0.1, True), (1.0, False)])
def test_dk_training_keeps_kernel_offsets_inside_the_scope(mult, inside, tmp_path):
    """With Adam at the full rate a zero-initialised offset generator moves its offsets by
    about lr x fan-in pixels per step (kernels sampled far outside the 4x4 scope within ten
    steps, where they are zero and get no gradient: training stalls at chance); the 0.1
    factor keeps them near the scope (its taps sit at 0.5..2.5, so |offset| < 2.5 inside)."""
    out = tmp_path / "ck.pt"
    train("study_net", "dk", DATA, 1, out, seed=0, lr=6e-3, offset_lr_mult=mult, warmup_epochs=0.0,
          progressive_resize="off", **dict(QUICK, arch_kwargs={}, max_train_images=320))
    ck = _state(companion_paths(out)["last"])
    model = models.create("study_net", **ck["arch_kwargs"]).eval()
    model.load_state_dict(ck["state_dict"])
    inputs = {}
    layers = [m for m in model.modules() if hasattr(m, "kernel_offset_generator")]
    hooks = [m.register_forward_hook(lambda mod, inp, out: inputs.__setitem__(mod, inp[0])) for m in layers]
    batch = torch.stack([open_data(DATA, split="val")[i]["image"] for i in range(8)])
    with torch.no_grad():
        model(batch)
        biggest = max(float(m.kernel_offset_generator(inputs[m]).abs().max()) for m in layers)
    for h in hooks:
        h.remove()
    assert biggest > 0.0
    assert (biggest < 2.5) == inside, biggest


def test_interrupt_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    out = tmp_path / "ck.pt"
    train("study_net", "conv", DATA, 1, out, seed=0, **QUICK)
    before = {k: p.read_bytes() for k, p in companion_paths(out).items()}
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train("study_net", "conv", DATA, 3, out, seed=0, resume=True, **QUICK)
    monkeypatch.setattr(torch, "save", real_save)
    assert {k: p.read_bytes() for k, p in companion_paths(out).items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.last.pt", "ck.metrics.json", "ck.pt"]
    assert _state(companion_paths(out)["last"])["epoch"] == 1


def test_folder_without_splits_is_held_out(tmp_path):
    rng = np.random.default_rng(0)
    for cls, channel in (("red", 0), ("blue", 2)):
        (tmp_path / cls).mkdir()
        for i in range(10):
            a = rng.integers(0, 60, (12, 12, 3)).astype(np.uint8)
            a[..., channel] = 250
            Image.fromarray(a).save(tmp_path / cls / f"{i}.png")
    m = train("study_net", "conv", str(tmp_path), 3, tmp_path / "out" / "ck.pt", image_size=16,
              arch_kwargs=TINY, batch_size=4, progress=False)
    assert (m["num_train"], m["num_val"], m["num_test"]) == (16, 2, 2)
    ck = _state(tmp_path / "out" / "ck.pt")
    assert ck["class_names"] == ["blue", "red"] and ck["size_bin_edges"] is None and ck["input_size"] == [3, 16, 16]


def test_errors(tmp_path):
    with pytest.raises(ErfLabError, match="unlabelled"):
        train("study_net", "conv", "noise", 1, tmp_path / "a.pt", **QUICK)
    with pytest.raises(ErfLabError, match="unknown op"):
        train("study_net", "deform", DATA, 1, tmp_path / "a.pt", **QUICK)
    with pytest.raises(ErfLabError, match="unknown arch"):
        train("resnet9000", "conv", DATA, 1, tmp_path / "a.pt", **QUICK)
    with pytest.raises(ErfLabError, match="epochs"):
        train("study_net", "conv", DATA, 0, tmp_path / "a.pt", **QUICK)
    for bad in ("fast", -0.1, True):
        with pytest.raises(ErfLabError, match="offset_lr_mult"):
            train("study_net", "conv", DATA, 1, tmp_path / "a.pt", offset_lr_mult=bad, **QUICK)
    train("study_net", "conv", DATA, 1, tmp_path / "b.pt", **QUICK)
    with pytest.raises(ErfLabError, match="was trained as study_net/conv"):
        train("study_net", "dk", DATA, 2, tmp_path / "b.pt", resume=True, **QUICK)
    (tmp_path / "c.last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ErfLabError, match="cannot read the checkpoint to resume"):
        train("study_net", "conv", DATA, 2, tmp_path / "c.pt", resume=True, **QUICK)


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = ["train", "--arch", "study_net", "--op", "condconv", "--data", DATA, "--epochs", "1", "--out", str(out),
            "--max-train-images", "32", "--max-eval-images", "16", "--batch-size", "16", "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and str(out) in printed
    assert cli.main([a if a != "1" else "2" for a in args] + ["--resume"]) == 0
    ck = _state(out.with_name("cli.last.pt"))
    assert ck["epoch"] == 2 and len(ck["metrics"]["history"]) == 2 and ck["arch_kwargs"]["op"] == "condconv"


def test_resize_schedule_and_training_resolution():
    """Parsing (the CLI's), validation and the step function, checked against the documented schedule by hand."""
    import argparse

    import cli

    steps = erf_train.resize_schedule(cli._resize_steps("0.3:0.5,0.6:0.75"))
    assert steps == ((0.3, 0.5), (0.6, 0.75)) == erf_train.resize_schedule([[0.3, 0.5], [0.6, 0.75]])
    assert erf_train.resize_schedule("auto", "study_net") == erf_train.PROGRESSIVE_RESIZE
    assert erf_train.resize_schedule("auto", "mobilenet_v2") == ()
    assert erf_train.resize_schedule("off") == erf_train.resize_schedule(None) == ()
    for bad in ("0.6:0.5,0.3:0.75", "0.3:0.5,0.3:0.75", "1.5:0.5", "0.5:0", "0.5", "x:y", [[0.5]]):
        with pytest.raises(ErfLabError, match="progressive resize"):
            erf_train.resize_schedule(bad)  # the library takes steps, never strings
    for bad in ("0.6:0.5,0.3:0.75", "0.3:0.5,0.3:0.75", "1.5:0.5", "0.5:0"):  # steps, refused by the library
        with pytest.raises(ErfLabError, match="progressive resize"):
            erf_train.resize_schedule(cli._resize_steps(bad))
    for bad in ("0.5", "x:y", "0.3:0.5,"):  # not steps: the CLI's usage error
        with pytest.raises(argparse.ArgumentTypeError):
            cli._resize_steps(bad)
    res = [erf_train.train_resolution(p, steps, (64, 64)) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)]
    assert res == [(32, 32), (32, 32), (48, 48), (48, 48), (64, 64), (64, 64)]
    # sides round to multiples of 8 px (60 * 0.5 = 30 -> 32; 44 * 0.75 = 33 -> 32), at least 8
    assert erf_train.train_resolution(0.0, ((1.0, 0.5),), (60, 44)) == (32, 24)
    assert erf_train.train_resolution(0.4, steps, (60, 44)) == (48, 32)
    assert erf_train.train_resolution(0.0, ((1.0, 0.1),), (32, 32)) == (8, 8)


def test_progressive_resize_feeds_smaller_batches_early(tmp_path, monkeypatch):
    """The model sees training batches at the scheduled sizes (epoch e of E at progress e/E)
    and validates at full size; the schedule is recorded in the checkpoint."""
    seen = []
    create = models.create

    def create_and_watch(*args, **kwargs):
        model = create(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inp: seen.append((m.training, tuple(inp[0].shape[-2:]))))
        return model

    monkeypatch.setattr(models, "create", create_and_watch)
    train("study_net", "conv", DATA, 4, tmp_path / "r.pt", progressive_resize=[[0.25, 0.5], [0.5, 0.75]], **QUICK)
    train_sizes = [size for training, size in seen if training]
    assert train_sizes == [(16, 16)] * 4 + [(24, 24)] * 4 + [(32, 32)] * 8  # 64 images in batches of 16
    assert {size for training, size in seen if not training} == {(32, 32)}
    assert _state(tmp_path / "r.pt")["train_args"]["progressive_resize"] == [[0.25, 0.5], [0.5, 0.75]]
    seen.clear()
    train("study_net", "conv", DATA, 2, tmp_path / "o.pt", progressive_resize="off", **QUICK)
    assert {size for _, size in seen} == {(32, 32)}


def test_time_budget_stops_the_run_and_anneals_the_rate(tmp_path):
    """With a time budget the epoch count is a cap: the run stops (mid-epoch if need be)
    within the budget, the cosine schedule has run over it, and the files are complete."""
    budget = 4.0
    m = train("study_net", "conv", DATA, 1000, tmp_path / "t.pt", time_budget_s=budget, lr=1e-2, **QUICK)
    assert 1 < len(m["history"]) < 1000 and m.get("stopped_by_time_budget")
    assert m["train_seconds"] <= 1.1 * budget  # stops on time, give or take a step on a busy machine
    # lr = peak * (1 + cos(pi * spent / budget)) / 2 after the warm-up: falling, past half the budget at the end
    lrs = [h["lr"] for h in m["history"]]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.5 * 1e-2
    assert sum(h["train_images"] for h in m["history"][:-1]) == 64 * (len(m["history"]) - 1)
    ck = _state(tmp_path / "t.pt")
    assert ck["train_args"]["time_budget_s"] == budget and ck["metrics"]["test_acc"] == m["test_acc"]
    with pytest.raises(ErfLabError, match="time budget"):
        train("study_net", "conv", DATA, 1, tmp_path / "u.pt", time_budget_s=0, **QUICK)


def test_keep_every_must_be_a_positive_integer():
    from erf_lab.train import TrainConfig, epoch_path

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ErfLabError, match="keep_every"):
            TrainConfig(keep_every=bad)
    assert epoch_path("runs/a/best.pt", 12).as_posix() == "runs/a/epoch_12.pt"
