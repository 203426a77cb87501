"""erf_lab.compare and the multi-layer engine under it, against oracles: the binomial ERFs of a
uniform linear stack (float64), separate compute_erf calls, two copies of one model, the epochs
that files record, and the files a comparison writes."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import erf_lab
from erf_lab import compute_erf
from erf_lab.comparison import ComparisonResult, resolve_models
from erf_lab.erf import compute_layer_erfs
from erf_lab.errors import ErfLabError
from erf_lab.layers import spatial_depth, stage_layers

N_LAYERS = 6
SIDE = 24


def _linear_stack(n: int = N_LAYERS) -> nn.Sequential:
    """n 2x2 convolutions with all-one weights, no bias, no padding: layer k's unit at (y, x) sums
    C(k, i) C(k, j) x[y + i, x + j], so its ERF is an outer product of binomial rows."""
    convs = [nn.Conv2d(1, 1, 2, bias=False) for _ in range(n)]
    for c in convs:
        nn.init.ones_(c.weight)
    return nn.Sequential(*convs).double().eval()


def _binomial_erf(k: int, unit, side: int) -> np.ndarray:
    row = np.array([math.comb(k, i) for i in range(k + 1)], dtype=np.float64)
    m = np.zeros((side, side))
    m[unit[0] : unit[0] + k + 1, unit[1] : unit[1] + k + 1] = np.outer(row, row)
    return m


@pytest.fixture(scope="module")
def stack_result():
    images = torch.randn(5, 1, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net = _linear_stack()
    return net, erf_lab.compare([net], layers=[str(k) for k in range(N_LAYERS)], data=images, preset="luo",
                                progress=False)


def test_linear_stack_grid_is_the_binomial_erfs(stack_result):
    _, r = stack_result
    assert not r.failures and len(r.columns) == N_LAYERS
    for j in range(N_LAYERS):
        cell = r.cells[(0, j)]
        expected = _binomial_erf(j + 1, cell.meta["unit"], SIDE)
        np.testing.assert_allclose(cell.map, expected, rtol=0, atol=1e-9)
        assert r.depth[(0, j)] == j + 1


def test_linear_stack_growth_slope_is_one_half(stack_result):
    _, r = stack_result
    t = r.table()
    depth, sigma = t["depth"].to_numpy(float), t["sigma"].to_numpy(float)
    np.testing.assert_allclose(sigma, np.sqrt(depth) / 2, rtol=1e-9)  # binomial variance k/4
    slope = np.polyfit(np.log(depth), np.log(sigma), 1)[0]
    assert abs(slope - 0.5) < 1e-9


def test_options_override_the_preset_and_reach_every_map():
    net = _linear_stack(3)
    with torch.no_grad():
        net[0].weight.neg_()  # a negative map: the signed luo map, its abs under grad_rectify="abs"
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    signed = erf_lab.compare([net], layers=["2"], data=x, preset="luo", progress=False)
    rectified = erf_lab.compare([net], layers=["2"], data=x, preset="luo", grad_rectify="abs", progress=False)
    assert rectified.meta["options"]["grad_rectify"] == "abs" and signed.meta["options"]["grad_rectify"] is None
    np.testing.assert_allclose(rectified.cells[(0, 0)].map, np.abs(signed.cells[(0, 0)].map), atol=1e-12)
    assert signed.cells[(0, 0)].map.min() < 0


def test_stages_of_a_linear_stack_are_its_layers(stack_result):
    net, _ = stack_result
    x = torch.zeros(1, 1, SIDE, SIDE, dtype=torch.float64)
    assert [s.name for s in stage_layers(net, x)] == [str(k) for k in range(N_LAYERS)]
    assert spatial_depth(net, x, ["0", "5"]) == {"0": 1, "5": 6}


def test_stages_of_resnet_and_mobilenet():
    from dk_ops import models

    r = models.create("resnet50_dw", op="conv", num_classes=10).eval()
    assert [s.name for s in stage_layers(r, torch.zeros(1, 3, 64, 64))] == ["stem.2", "layer1", "layer2", "layer3", "layer4"]
    m = models.create("mobilenet_v2", op="conv", num_classes=10).eval()
    names = [s.name for s in stage_layers(m, torch.zeros(1, 3, 64, 64))]
    assert names == ["features.1", "features.3", "features.6", "features.13", "features"]  # features.18 is features


def test_layer_erfs_equal_separate_compute_erf_calls():
    """One pass over several layers (crops, the shared forward of the full-image layers) gives
    each layer's compute_erf map; in float64 to 1e-10."""
    from dk_ops import models

    torch.manual_seed(0)
    net = models.create("study_net", op="conv", num_classes=10).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layers = ["stem", "blocks.1", "blocks.3", "blocks"]
    together = compute_layer_erfs(net, x, layers, progress=False, batch_size=4)
    assert any(r.meta["shared_forward"] for r in together), [r.meta["locality"] for r in together]
    for name, r in zip(layers, together):
        alone = compute_erf(net, x, layer=name, progress=False, batch_size=4)
        assert r.meta["layer"] == name and r.n_images == alone.n_images == 6
        np.testing.assert_allclose(r.map, alone.map, rtol=1e-10, atol=1e-12 * np.abs(alone.map).max())


def test_two_copies_of_one_model_give_identical_rows(tmp_path):
    r = erf_lab.compare(["study:study_net-conv-s0", "study:study_net-conv-s0"], layers="stages", num_images=4,
                        progress=False)
    assert [m["name"] for m in r.models] == ["study_net-conv-s0", "study_net-conv-s0 (2)"]
    for j in range(len(r.columns)):
        np.testing.assert_array_equal(r.cells[(0, j)].map, r.cells[(1, j)].map)
    t = r.table()
    a, b = (t[t.model == m["name"]].drop(columns=["model"]).reset_index(drop=True) for m in r.models)
    assert a.equals(b)


def _epoch_file(path: Path, epoch: int) -> Path:
    from erf_lab.study_models import resolve

    ck = torch.load(resolve("study:study_net-conv-s0"), weights_only=True)
    ck["epoch"] = epoch
    torch.save(ck, path)
    return path


def test_a_glob_is_ordered_by_the_recorded_epoch_not_by_name(tmp_path):
    for name, epoch in (("epoch_10.pt", 10), ("epoch_2.pt", 2), ("epoch_9.pt", 9), ("zz_first.pt", 1)):
        _epoch_file(tmp_path / name, epoch)
    entries = resolve_models([str(tmp_path / "*.pt")])
    assert [e.epoch for e in entries] == [1, 2, 9, 10]
    assert [Path(e.loaded.path).name for e in entries] == ["zz_first.pt", "epoch_2.pt", "epoch_9.pt", "epoch_10.pt"]
    assert [e.name for e in entries] == ["epoch 1", "epoch 2", "epoch 9", "epoch 10"]


def test_a_glob_of_files_without_epochs_is_refused(tmp_path):
    from dk_ops import models

    for name in ("a.pt", "b.pt"):  # plain state_dicts: loadable, but no epoch recorded
        torch.save(models.create("study_net").state_dict(), tmp_path / name)
    with pytest.raises(ErfLabError, match="records no epoch"):
        resolve_models([str(tmp_path / "*.pt")], arch="study_net")


def test_untrained_keeps_the_architecture_and_draws_fresh_seeded_weights():
    trained, fresh, again = resolve_models(["study:study_net-dk-s0", "untrained:study:study_net-dk-s0",
                                            "untrained:study:study_net-dk-s0"], seed=3)
    assert fresh.untrained and fresh.epoch == 0 and fresh.name == "study_net-dk-s0 (untrained)"
    a, b, c = (dict(e.loaded.model.state_dict()) for e in (trained, fresh, again))
    assert a.keys() == b.keys()
    assert not torch.equal(a["fc.weight"], b["fc.weight"])
    assert all(torch.equal(b[k], c[k]) for k in b)  # the same seed: the same weights


def test_a_failing_model_is_recorded_and_the_others_run(tmp_path):
    from erf_lab.study_models import resolve

    ck = torch.load(resolve("study:study_net-conv-s0"), weights_only=True)
    ck["state_dict"] = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    torch.save(ck, tmp_path / "nan.pt")
    r = erf_lab.compare(["study:study_net-conv-s0", str(tmp_path / "nan.pt")], layers=["blocks"], num_images=3,
                        progress=False, out=str(tmp_path / "out"))
    assert [f["model"] for f in r.failures] == ["nan"] and "finite" in r.failures[0]["error"]
    assert (0, 0) in r.cells and (1, 0) not in r.cells
    t = r.table()
    assert t.error.tolist() == ["", r.failures[0]["error"]]
    assert (tmp_path / "out" / "compare.png").is_file()
    with pytest.raises(ErfLabError, match="every job failed"):
        erf_lab.compare([str(tmp_path / "nan.pt")], layers=["blocks"], num_images=2, progress=False,
                        out=str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_saved_files_load_back_and_the_page_is_self_contained(tmp_path, stack_result):
    _, r = stack_result
    r.save(tmp_path)
    for name in ("compare.csv", "compare.npz", "compare.json", "compare.png", "growth.png", "index.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    back = ComparisonResult.load(tmp_path)
    assert back.columns == r.columns and back.depth == r.depth
    for k, cell in r.cells.items():
        np.testing.assert_array_equal(back.cells[k].map, cell.map)
    import pandas as pd

    csv = pd.read_csv(tmp_path / "compare.csv")
    assert len(csv) == len(r.models) * len(r.columns)
    np.testing.assert_allclose(csv["sigma"], r.table()["sigma"], rtol=1e-5)
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "http://" not in page.replace("http://www.w3.org", "") and "<script" not in page
    assert json.loads((tmp_path / "compare.json").read_text())["format"] == "erf-lab-compare"


def test_bad_inputs_fail_before_any_work(tmp_path):
    net = _linear_stack(2)
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    with pytest.raises(ErfLabError, match="no layer named '7'"):
        erf_lab.compare([net], layers=["0", "7"], data=x, progress=False)
    with pytest.raises(ErfLabError, match="no file matches"):
        erf_lab.compare([str(tmp_path / "nothing_*.pt")], progress=False)
    with pytest.raises(ErfLabError, match="names"):
        erf_lab.compare([net, net], names=["a"], data=x, progress=False)
    with pytest.raises(ErfLabError, match="unknown preset"):
        erf_lab.compare([net], data=x, preset="nope", progress=False)
