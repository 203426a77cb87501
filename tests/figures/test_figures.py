"""Tests for figures/: every figure function on a tiny configuration, the theory identities,
the report, the CLI, and the checkpoint cache (a second run does not retrain)."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import figures
from erf_lab.errors import ErfLabError
from figures import config as fconfig

TINY_NET = {"widths": (4, 8, 8), "stem_width": 4, "depth": 1}
TINY = dict(source="train", ops=("conv", "dcn", "condconv", "dk"), seeds=(0,), epochs=1, batch_size=16,
            max_train_images=32, max_eval_images=32, arch_kwargs=TINY_NET, tsne_arch="study_net",
            tsne_arch_kwargs=TINY_NET, tsne_ops=("condconv", "dk"), tsne_seeds=(0,), tsne_epochs=1, n_boot=200)


def _decodes(path: Path) -> None:
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 50 and im.size[1] > 50


def _pdf(path: Path) -> None:
    assert path.read_bytes()[:5] == b"%PDF-"


def _figure_files(d: Path, stem: str) -> None:
    _decodes(d / f"{stem}.png")
    _pdf(d / f"{stem}.pdf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four operator variants of a tiny study net, one epoch on 32 images (cached in out/models)."""
    out = tmp_path_factory.mktemp("figures_run")
    cfg = fconfig.config_for("quick", **TINY)
    ckpts = fconfig.prepare_models(cfg, out, progress=False)
    return {"out": out, "cfg": cfg, "ckpts": ckpts}


# ---- theory -------------------------------------------------------------------------------------
def test_analytic_box_erf_is_the_repeated_convolution():
    from figures.theory import analytic_box_erf

    for n, k in ((1, 3), (3, 3), (4, 5)):
        axis = np.ones(1)
        for _ in range(n):
            axis = np.convolve(axis, np.ones(k) / k)
        m = analytic_box_erf(n, k, len(axis) + 2)
        np.testing.assert_allclose(m[1:-1, 1:-1], np.outer(axis, axis), rtol=0, atol=1e-15)
        assert m.sum() == pytest.approx(1.0, abs=1e-12) and m[0].sum() == 0
    with pytest.raises(ValueError):
        analytic_box_erf(4, 3, 5)


def test_dk_blend_property_and_a_wrong_blend_fails():
    from figures.theory import dk_blend_erfs

    r = dk_blend_erfs(depth=2, kernel_size=3, scope_size=5, size=19, seed=3)
    assert r["n_corner_erfs"] == 16
    assert r["max_abs_residual"] < 1e-9
    assert np.abs(r["direct"]).max() > 0.1  # a real map, not zeros
    # the fractional offsets really move the ERF: it differs from every integer-offset ERF
    assert all(abs(dy - round(dy)) > 0.04 and abs(dx - round(dx)) > 0.04 for dy, dx in r["offsets"])
    from figures.theory import _erf64

    rng = np.random.default_rng(3)
    w = [torch.from_numpy(rng.uniform(0.1, 1.0, (1, 1, 5, 5))) for _ in range(2)]
    a = _erf64(w, [(0.0, 0.0), (0.0, 0.0)], 3, 19)
    b = _erf64(w, [(0.5, 0.0), (0.0, 0.0)], 3, 19)
    assert np.abs(a - b).max() > 1e-3


def test_linear_erf_theory_files_and_numbers(tmp_path):
    r = figures.linear_erf_theory(tmp_path, depths=(1, 3, 6), dk_depth=2)
    _figure_files(tmp_path, "theory")
    df = pd.read_csv(tmp_path / "theory_depth.csv")
    assert list(df.depth) == [1, 3, 6]
    assert {"max_rel_residual", "luo_size_computed", "luo_size_analytic", "sigma_computed", "sigma_analytic"} <= set(df)
    assert df.max_rel_residual.max() < 1e-9  # float64 end to end
    np.testing.assert_allclose(df.sigma_computed, df.sigma_closed_form, rtol=1e-5)
    meta = json.loads((tmp_path / "theory.json").read_text())
    assert {"options", "seed", "versions", "summary"} <= set(meta)
    assert meta["summary"]["dk_blend_max_abs_residual"] < 1e-9
    assert abs(r.summary["slope_sigma"] - 0.5) < 1e-3
    with np.load(tmp_path / "theory.npz") as z:
        assert {"dk_direct", "dk_blend", "dk_residual", "computed_6", "analytic_6"} <= set(z.files)
    assert any("holds" in c for c in r.claims)


# ---- models and cache ---------------------------------------------------------------------------
def test_erf_comparison_stays_the_function_after_its_module_is_imported():
    import figures.erf_comparison  # noqa: F401  (binds the submodule on first import)
    import figures.run  # noqa: F401

    assert callable(figures.erf_comparison) and figures.erf_comparison.__name__ == "erf_comparison"


def test_config_errors():
    with pytest.raises(ErfLabError, match="mode"):
        fconfig.config_for("medium")
    with pytest.raises(ErfLabError, match="unknown op"):
        fconfig.config_for("quick", ops=("conv", "resnet"))
    with pytest.raises(ErfLabError, match="unknown figures option"):
        fconfig.config_for("quick", learning_rate=1)
    assert fconfig.config_for("full").seeds == (0, 1, 2) and fconfig.config_for("full").source == "train"
    assert fconfig.config_for("quick").source == "shipped"
    with pytest.raises(ErfLabError, match="source must be"):
        fconfig.config_for("quick", source="web")


def test_cached_models_are_not_retrained(tiny, monkeypatch, tmp_path):
    import shutil

    import erf_lab.train

    ckpts = tiny["ckpts"]
    assert set(ckpts) == set(TINY["ops"]) and all(p[0].is_file() for p in ckpts.values())
    mtimes = {p[0]: p[0].stat().st_mtime_ns for p in ckpts.values()}
    calls = []
    monkeypatch.setattr(erf_lab.train, "train", lambda *a, **k: calls.append((a, k)))
    again = fconfig.prepare_models(tiny["cfg"], tiny["out"], progress=False)
    assert again == ckpts and calls == []
    assert {p[0]: p[0].stat().st_mtime_ns for p in again.values()} == mtimes
    # other training options: the cached checkpoint is not reused
    shutil.copytree(tiny["out"] / "models", tmp_path / "models")
    other = fconfig.config_for("quick", **dict(TINY, ops=("conv",), epochs=2))
    fconfig.prepare_models(other, tmp_path, progress=False)
    assert len(calls) == 1 and calls[0][0][:4] == (other.arch, "conv", other.data, 2)


def test_parallel_training_matches_sequential(tmp_path):
    """``jobs=2`` trains in two worker processes of ``cpus // 2`` threads; the checkpoints are
    those of a sequential run with that many threads (a reduction's thread count changes the
    last bits, which training amplifies, so the same count is what makes them equal)."""
    import os

    cfg = fconfig.config_for("quick", **dict(TINY, ops=("conv", "dk")))
    got = fconfig.prepare_models(cfg, tmp_path / "parallel", progress=False, jobs=2)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        ref = fconfig.prepare_models(cfg, tmp_path / "sequential", progress=False)
    finally:
        torch.set_num_threads(before)
    assert set(got) == set(ref) == {"conv", "dk"}
    for op in ref:
        mine = torch.load(got[op][0], weights_only=True)["state_dict"]
        theirs = torch.load(ref[op][0], weights_only=True)["state_dict"]
        assert mine.keys() == theirs.keys()
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0, msg=f"{op} {k}")
        assert json.loads(got[op][0].with_suffix(".figures.json").read_text())["complete"] is True


def test_user_models_dir(tiny, tmp_path):
    with pytest.raises(ErfLabError, match="no checkpoint"):
        fconfig.prepare_models(tiny["cfg"], tmp_path / "out", models_dir=tmp_path)
    got = fconfig.prepare_models(tiny["cfg"], tmp_path / "out", models_dir=tiny["out"] / "models")
    assert set(got) == set(TINY["ops"])


# ---- figures on the tiny models -----------------------------------------------------------------
def test_accuracy_table(tiny, tmp_path):
    from dk_ops.models import complexity
    from erf_lab import load_model

    r = figures.accuracy_table(tiny["ckpts"], tmp_path, latency_repeats=2, latency_batch_sizes=(1,), n_boot=200)
    _figure_files(tmp_path, "accuracy")
    df = pd.read_csv(tmp_path / "accuracy.csv")
    assert list(df.op) == list(TINY["ops"])
    assert {"test_acc_mean", "test_acc_std", "params", "macs", "sampling_macs", "latency_ms_b1"} <= set(df)
    assert df.latency_ms_b1.gt(0).all() and df.test_acc_mean.between(0, 1).all()
    lm = load_model(str(tiny["ckpts"]["dk"][0]))
    assert int(df.set_index("op").loc["dk", "params"]) == complexity(lm.model, (3, 64, 64))["params"]
    # re-measured on the whole test split; the training run measured its 32-image subset
    assert df.set_index("op").loc["dk", "recorded_test_acc_mean"] == pytest.approx(lm.meta["metrics"]["test_acc"])
    assert (df.ci_low <= df.test_acc_mean).all() and (df.test_acc_mean <= df.ci_high).all()
    bins = pd.read_csv(tmp_path / "accuracy_per_size_bin.csv")
    assert {"op", "size_bin", "test_acc_mean"} <= set(bins)
    assert {"options", "versions", "rows"} <= set(json.loads((tmp_path / "accuracy.json").read_text()))
    assert r.table is not None and len(r.claims) >= 2
    assert [e.measure for e in r.effects] == ["test accuracy dk - conv"]
    assert ("Warning" in " ".join(r.claims)) == bool((df.test_acc_mean < 2 * df.chance).any())


def test_erf_comparison(tiny, tmp_path):
    r = figures.erf_comparison(tiny["ckpts"], tmp_path, erf_images=3, instance_per_bin=1, progress=False, n_boot=100)
    for stem in ("erf_instances", "erf_dataset", "erf_mass_in_box"):
        _figure_files(tmp_path, stem)
    per = pd.read_csv(tmp_path / "erf_mass_in_box.csv")
    assert {"op", "size_bin", "erf_mass_in_box", "box_area_fraction", "unit_y", "unit_x"} <= set(per)
    assert per.erf_mass_in_box.between(0, 1).all() and set(per.op) == set(TINY["ops"])
    assert per.size_bin.nunique() == 10
    by_bin = pd.read_csv(tmp_path / "erf_mass_by_bin.csv")
    assert len(by_bin) == 10 * len(TINY["ops"])
    met = pd.read_csv(tmp_path / "erf_dataset_metrics.csv")
    assert {"op", "luo_size", "sigma_y", "area_ratio@0.2", "n_images"} <= set(met) and met.n_images.eq(3).all()
    for op in TINY["ops"]:
        assert (tmp_path / "dataset" / op / "erf.npz").is_file()
    with np.load(tmp_path / "erf_instances.npz") as z:
        assert "image_small" in z.files and "box_large" in z.files
    meta = json.loads((tmp_path / "erf_comparison.json").read_text())
    assert meta["options"]["layer"]["conv"] == "blocks"
    assert [e.measure for e in r.effects] == ["ERF mass in box dk - dcn", "ERF mass in box dk - conv",
                                              "ERF spread / box side dcn - dk"]


def test_offsets_by_size(tiny, tmp_path):
    r = figures.offsets_by_size(tiny["ckpts"], tmp_path, per_bin=1, progress=False, n_boot=100)
    _figure_files(tmp_path, "offsets")
    per = pd.read_csv(tmp_path / "offsets_per_image.csv")
    assert set(per.op) == {"dcn", "dk"}  # conv and condconv have no deformable layers
    assert set(per[per.op == "dk"].kind) == {"kernel_offset"} and set(per[per.op == "dcn"].kind) == {"offset"}
    assert {"layer", "size_bin", "mean_abs", "mean_radial", "kernel_dispersion"} <= set(per) and per.mean_abs.ge(0).all()
    assert per[per.kind == "kernel_offset"].kernel_dispersion.ge(0).all()
    corr = pd.read_csv(tmp_path / "offsets_correlation.csv")
    assert {"spearman_size_mean_radial", "ci_low_mean_radial", "spearman_size_kernel_dispersion"} <= set(corr)
    assert [e.claim_id for e in r.effects] == ["3", "3"] and len(r.claims) == 3


def test_offset_statistics():
    from figures.offsets import _box_masks, _stats, _tap_directions

    dirs = _tap_directions(3, 3)
    assert dirs[4].abs().sum() == 0 and torch.allclose(dirs[0], torch.tensor([-1.0, -1.0], dtype=torch.float64) / math.sqrt(2))
    spread = (dirs * 0.5).reshape(1, -1).float()  # every tap moves 0.5 outwards: a global offset
    mean_abs, radial = _stats(spread, 9, dirs, None)
    assert radial[0] == pytest.approx(0.5) and mean_abs[0] == pytest.approx(0.5 * 8 / 9)
    mean_abs, radial = _stats(-spread, 9, dirs, None)
    assert radial[0] == pytest.approx(-0.5)
    local = torch.zeros(1, 18, 4, 4)
    local[0, :, 0, 0] = spread[0]
    mask = _box_masks(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), (64, 64), (4, 4))
    assert mask[0, 0, 0] and mask.sum() == 1
    assert _stats(local, 9, dirs, mask)[1][0] == pytest.approx(0.5)
    tiny_box = _box_masks(torch.tensor([[40.0, 40.0, 1.0, 1.0]]), (64, 64), (4, 4))
    assert tiny_box.sum() == 1 and tiny_box[0, 2, 2]


def test_tsne_figure(tiny, tmp_path):
    r = figures.tsne_figure(tiny["ckpts"], tmp_path, max_samples=40, n_iter=250, perplexity=5, progress=False,
                            tsne_runs=2, n_boot=100)
    _figure_files(tmp_path, "tsne")
    scores = pd.read_csv(tmp_path / "tsne_scores.csv")
    assert {"model", "labels", "space", "knn_acc", "chance"} <= set(scores)
    assert set(scores.model) == set(TINY["ops"])
    with np.load(tmp_path / "tsne_embeddings.npz") as z:
        assert z["dk_coords"].shape == (40, 2)
    assert (tmp_path / "report" / "index.html").is_file()
    grouping = pd.read_csv(tmp_path / "tsne_grouping.csv")
    assert set(grouping.space) == {"tsne", "features"}
    assert grouping[grouping.score == "class"].knn_acc.between(0, 1).all()  # size|class: NaN (4 samples per class)
    assert set(grouping[grouping.space == "tsne"].replicates) == {2}  # one model seed x two t-SNE seeds
    assert len(r.effects) == 4 and all("CondConv" in c for c in r.claims)


# ---- the whole run, report and CLI --------------------------------------------------------------
def test_cli_figures_theory_only(tmp_path, capsys, monkeypatch):
    import cli

    monkeypatch.setitem(fconfig._PRESETS, "quick", dict(fconfig._PRESETS["quick"], theory_depths=(1, 2)))

    rc = cli.main(["figures", "--only", "theory", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[theory]" in out and "RESULTS.md" in out
    md = (tmp_path / "RESULTS.md").read_text()
    assert "erf-lab figures" in md or "figures --only theory" in md
    assert "theory/theory.png" in md and "Linear ERF theory" in md
    html = (tmp_path / "index.html").read_text()
    assert "<img src=\"theory/theory.png\"" in html
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["failures"] == {} and run["options"]["figures"] == ["theory"]
    assert not (tmp_path / "models").exists()  # theory needs no trained models


def test_cli_figures_errors(tmp_path, capsys):
    import cli

    assert cli.main(["figures", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown figure" in capsys.readouterr().err
    assert cli.main(["figures", "--only", "accuracy", "--models", str(tmp_path / "missing"),
                     "--out", str(tmp_path)]) == 2


def test_run_figures_with_user_models(tiny, tmp_path):
    run = figures.run_figures(tmp_path, only=["accuracy", "offsets"], models_dir=tiny["out"] / "models",
                              progress=False, command="test", latency_repeats=1, instance_per_bin=1, n_boot=100)
    assert run["failures"] == {}
    assert [r.name for r in run["results"]] == ["accuracy", "offsets"]
    md = run["report"].read_text()
    assert "Command: `test`" in md and "| op |" in md and "accuracy/accuracy.png" in md
    assert md.index("## Verdicts") < md.index("## Options") and "| dk - conv" not in md
    assert "test accuracy dk - conv" in md
    assert not (tmp_path / "models").exists()  # nothing trained
    # a later partial run keeps the earlier figures in the report
    run2 = figures.run_figures(tmp_path, only=["theory"], progress=False, command="test2", theory_depths=(1, 2))
    md = run2["report"].read_text()
    assert "Command: `test2`" in md and "accuracy/accuracy.png" in md and "theory/theory.png" in md
    assert "from an earlier run" in md and md.index("Linear ERF theory") < md.index("Accuracy, size")


def test_figures_report_opens_with_the_verdicts_and_renders_in_chromium(tiny, tmp_path):
    import os
    import re
    import subprocess

    from tests.analyses.test_report_html import CHECK, CHROMIUM

    assert CHROMIUM, "chromium is needed (.ci/run installs it: apt-get install chromium)"
    run = figures.run_figures(tmp_path, only=["accuracy", "erf"], models_dir=tiny["out"] / "models", progress=False,
                              command="test", latency_repeats=1, instance_per_bin=1, erf_images=2, n_boot=100)
    effects = [e for r in run["results"] for e in r.effects]
    assert run["failures"] == {} and len(effects) == 4
    html = run["html"].read_text()
    assert html.index("id='verdicts'") < html.index("<h2>Accuracy")
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", CHECK.replace("document.body.appendChild(d);", """
  d.setAttribute('data-verdicts', document.querySelectorAll('#verdicts tbody tr').length);
  d.setAttribute('data-words', Array.prototype.map.call(document.querySelectorAll('#verdicts td.verdict'),
                                                        function (t) { return t.textContent; }).join(','));
  document.body.appendChild(d);""") + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1280,1000", "--virtual-time-budget=10000", "--allow-file-access-from-files", "--dump-dom",
           page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    m = re.search(r'id="img-check" data-total="(\d+)" data-ok="(\d+)" data-width="(\d+)" '
                  r'data-verdicts="(\d+)" data-words="([a-z,]*)"', proc.stdout)
    assert m, f"no check element in the dumped DOM (rc={proc.returncode}): {proc.stderr[-500:]}"
    total, ok, _, rows = (int(v) for v in m.groups()[:4])
    assert total == ok == 4  # accuracy, erf_instances, erf_dataset, erf_mass_in_box
    assert rows == len(effects)
    assert m.group(5).split(",") == [e.verdict for e in sorted(effects, key=lambda e: e.claim_id)]


def test_two_runs_give_identical_numbers_and_verdicts(tiny, tmp_path):
    def effects(out):
        t = figures.tsne_figure(tiny["ckpts"], out / "tsne", max_samples=200, n_iter=250, perplexity=5, progress=False,
                                tsne_runs=2, n_boot=100)
        e = figures.erf_comparison(tiny["ckpts"], out / "erf", erf_images=2, instance_per_bin=2, progress=False,
                                   n_boot=100)
        return [x.to_dict() for x in t.effects + e.effects], pd.read_csv(out / "tsne" / "tsne_grouping.csv")

    (a, ga), (b, gb) = effects(tmp_path / "a"), effects(tmp_path / "b")
    assert np.isfinite([x["effect"] for x in a]).all()
    assert json.dumps(a) == json.dumps(b)
    pd.testing.assert_frame_equal(ga, gb)
