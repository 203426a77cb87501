"""The shipped study models: every recipe shipped, each file a safe-loadable erf-lab checkpoint
whose recorded accuracy is re-measured here on its fixed test subset, names resolve, and the
retrain script's ship step round-trips."""
import shlex

import pytest
import torch

import cli
from erf_lab import load_model, study_models
from erf_lab.study_models import shipping
from erf_lab.errors import ErfLabError

SHIPPED = study_models.available()


def test_shipped_files_are_exactly_the_recipes():
    assert {p.stem for p in SHIPPED} == {r.name for r in study_models.RECIPES}
    ops = {r.op for r in study_models.RECIPES if r.arch == "study_net"}
    assert ops == {"conv", "dcn", "condconv", "dk_global", "dk", "dk_dcn"}
    assert {r.seed for r in study_models.RECIPES if r.arch == "study_net"} == {0, 1, 2}
    mnv2 = [r for r in study_models.RECIPES if r.arch == "mobilenet_v2"]
    assert {r.op for r in mnv2} == {"conv", "condconv", "dk"} and {r.seed for r in mnv2} == {0, 1}
    assert all(r.arch_kwargs == {"width_mult": 0.5, **study_models.op_kwargs(r.arch, r.op)} for r in mnv2)
    assert [r.name for r in mnv2 if r.offset_lr_mult is not None] == ["mobilenet_v2-dk-s0", "mobilenet_v2-dk-s1"]
    assert sum(p.stat().st_size for p in SHIPPED) < 25e6


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_checkpoint_is_safe_converged_and_still_measures_what_it_records(path):
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    assert ckpt["format"] == "erf-lab-checkpoint"
    info = ckpt["study"]
    recipe = study_models.Recipe(**info["recipe"])
    assert info["name"] == recipe.name == path.stem and info["seed"] == recipe.seed
    assert info["command"] == recipe.command()
    assert {"torch", "erf_lab", "python"} <= set(info["versions"])
    assert info["test_images"] == 1080 and info["test_acc"] >= 0.90
    # the training command is a real `erf-lab train` command line with the recipe's arguments
    args = cli.build_parser().parse_args(shlex.split(info["command"])[1:])
    assert (args.arch, args.op, args.epochs, args.seed, args.data) == (recipe.arch, recipe.op, recipe.epochs,
                                                                      recipe.seed, recipe.data)
    assert (args.width_mult is None) == ("width_mult" not in recipe.arch_kwargs) and args.lr == recipe.lr
    assert args.offset_clip == recipe.arch_kwargs.get("offset_clip")
    assert (None if args.offset_lr_mult == "auto" else args.offset_lr_mult) == recipe.offset_lr_mult
    # re-measured on the fixed subset: a change to the data generator or the model code shows here
    assert shipping.subset_accuracy(ckpt) == (info["subset_correct"], info["subset_size"])
    assert info["subset_size"] == study_models.SUBSET_SIZE


def test_names_resolve_with_defaults_and_bad_names_list_the_choices():
    assert study_models.resolve("study:dk") == study_models.SHIPPED_DIR / "study_net-dk-s0.pt"
    assert study_models.resolve("study:dk-s2").name == "study_net-dk-s2.pt"
    assert study_models.resolve("study:mobilenet_v2-condconv").name == "mobilenet_v2-condconv-s0.pt"
    with pytest.raises(ErfLabError, match="no shipped study model 'resnet'.*study_net-dk-s0"):
        study_models.resolve("study:resnet")
    lm = load_model("study:dcn-s1")
    assert lm.meta["arch_kwargs"]["op"] == "dcn" and lm.meta["study"]["seed"] == 1


def test_cli_models_lists_the_shipped_models_with_accuracy(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "study_net" in out and "study:study_net-dk-s0" in out and "test acc 0." in out


def test_ship_round_trip_on_a_tiny_run(tmp_path):
    recipe = study_models.Recipe("study_net", "dk", 0, 1, arch_kwargs={"widths": (4, 8, 8), "stem_width": 4, "depth": 1})
    from erf_lab.train import train

    work = tmp_path / "work" / f"{recipe.name}.pt"
    train(recipe.arch, recipe.op, recipe.data, recipe.epochs, work, arch_kwargs=dict(recipe.arch_kwargs),
          max_train_images=64, max_eval_images=64, progress=False)
    target = tmp_path / "ship" / f"{recipe.name}.pt"
    assert study_models.shipped_recipe(target) is None
    info = shipping.ship(work, target, recipe)
    assert study_models.shipped_recipe(target) == recipe.to_dict()
    ckpt = torch.load(str(target), weights_only=True)
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert {v.dtype for v in weights if v.dim() >= 2} == {torch.float16}
    assert {v.dtype for v in weights if v.dim() < 2} == {torch.float32}
    assert 0 <= info["test_acc"] <= 1 and info["test_images"] == 1080 and info["subset_size"] == 300
    lm = load_model(str(target))
    assert next(lm.model.parameters()).dtype == torch.float32


def test_figures_retrain_uses_the_shipped_recipes():
    from figures.config import config_for

    cfg = config_for("full")
    for r in study_models.RECIPES:
        key = cfg.training_key(r.op, r.seed, tsne=r.arch != cfg.arch)
        assert (key["arch"], key["arch_kwargs"], key["epochs"], key["data"], key["lr"], key["offset_lr_mult"]) == \
            (r.arch, dict(r.arch_kwargs), r.epochs, r.data, r.lr, r.offset_lr_mult), r.name
        assert key["max_train_images"] is None and key["max_eval_images"] is None
    assert set(cfg.seeds) == {r.seed for r in study_models.RECIPES if r.arch == cfg.arch}
    assert set(cfg.tsne_seeds) == {r.seed for r in study_models.RECIPES if r.arch == cfg.tsne_arch}


def test_figures_use_the_seeds_every_variant_has(tmp_path, monkeypatch):
    from figures.config import _shipped

    monkeypatch.setattr(study_models, "SHIPPED_DIR", tmp_path)
    for name in ("study_net-conv-s0", "study_net-dk-s0", "study_net-conv-s1"):
        (tmp_path / f"{name}.pt").touch()
    notes = []
    got = _shipped("study_net", ("conv", "dk"), (0, 1), notes)
    assert got == {"conv": [tmp_path / "study_net-conv-s0.pt"], "dk": [tmp_path / "study_net-dk-s0.pt"]}
    assert len(notes) == 1 and "seed(s) 1 left out" in notes[0] and "study_net-dk-s1" in notes[0]
    with pytest.raises(ErfLabError, match="shipped study models missing: study_net-dcn-s0"):
        _shipped("study_net", ("conv", "dcn"), (0,))
