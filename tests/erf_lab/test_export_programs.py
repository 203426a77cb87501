"""torch.export programs (.pt2) as erf-lab models: load_model -> ExportedModule, against the eager model.

Every check compares the loaded program with the eager model it was exported from (outputs,
hooked layer outputs, input gradients, theoretical receptive fields); models are built and
exported once per module, at 64x64.
"""
import re
import warnings
import zipfile

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.export import Dim

from dk_ops import backend, models
from erf_lab.layers import get_layer, run_to_layer
from erf_lab.checkpoint import ExportedModule, load_model
from erf_lab.errors import ErfLabError
from erf_lab.rf import theoretical_rf

SIZE = (3, 64, 64)
RF_COLUMNS = ["shape", "rf_y", "rf_x", "stride_y", "stride_x", "center0_y", "center0_x", "global"]


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and DK kernel offsets (the zoo zero-initialises the offset generators)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if name.endswith("kernel_offset_generator"):
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
    return model.eval()


def _save(ep, path) -> str:
    torch.export.save(ep, path)
    return str(path)


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    """name -> (eager model, .pt2 path): resnet18 with a static batch of 1 and with a dynamic batch
    (1..8), the zoo's study net with DK layers (exported through the native dk_ops op)."""
    d = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    r18 = _randomise(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, *SIZE)
    out = {
        "r18": (r18, _save(torch.export.export(r18, (x,)), d / "r18.pt2")),
        "r18_dyn": (r18, _save(torch.export.export(r18, (torch.randn(2, *SIZE),),
                                                   dynamic_shapes={"x": {0: Dim("batch", min=1, max=8)}}),
                               d / "r18_dyn.pt2")),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DK_OPS_BACKEND", "native")  # the export must record the custom op, not the reference path
        assert backend.load_native(), backend.backend_info()
        study = _randomise(models.create("study_net", op="dk", num_classes=10))
        study(x)
        ep = torch.export.export(study, (x,))
    assert any("dk_ops" in str(n.target) for n in ep.graph.nodes)
    out["study"] = (study, _save(ep, d / "study.pt2"))
    for m in (r18, study):
        m.requires_grad_(False)  # as the ERF engine runs models: input gradients only
    return out


@pytest.fixture(scope="module")
def loaded(progs):
    out = {name: load_model(path) for name, (_, path) in progs.items()}
    for lm in out.values():
        lm.model.requires_grad_(False)
    return out


def _rf_must_match_eager(model: nn.Module, eager: nn.Module, size=SIZE) -> None:
    got = theoretical_rf(model, size).set_index("layer")
    want = theoretical_rf(eager, size).set_index("layer")
    assert set(want.index) <= set(got.index)  # every eager layer (the program adds DK offset generators)
    for name in want.index:
        assert got.loc[name, RF_COLUMNS].tolist() == want.loc[name, RF_COLUMNS].tolist(), name
        assert got.loc[name, "type"] == want.loc[name, "type"], name


@pytest.mark.parametrize("name", ["r18", "r18_dyn", "study"])
def test_loads_as_an_eval_module_with_the_eager_names_and_weights(progs, loaded, name):
    eager, _ = progs[name]
    lm = loaded[name]
    m = lm.model
    assert lm.kind == "export" and isinstance(m, ExportedModule)
    assert m.eval() is m and m.train(False) is m and not m.training
    assert not any(sub.training for sub in m.modules())
    with pytest.raises(ErfLabError, match="training mode") as info:
        m.train()
    assert "\n" not in str(info.value) and not m.training
    names = dict(m.named_modules())
    for want in (["layer4", "layer1.0.conv1", "layer2.0.downsample.1", "fc"] if name != "study"
                 else ["stem.0", "blocks.2.conv.3", "blocks.3", "pool", "fc"]):
        assert want in names
    # parameters and BN buffers under the eager names, equal to the eager ones
    state, eager_state = m.state_dict(), eager.state_dict()
    assert set(state) == set(eager_state)
    assert all(torch.equal(state[k], eager_state[k]) for k in eager_state)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in eager.parameters())
    assert any(k.endswith("running_var") for k, _ in m.named_buffers())
    assert m.to("cpu") is m


@pytest.mark.parametrize("name, batch", [("r18", 1), ("r18_dyn", 1), ("r18_dyn", 3), ("study", 1)])
def test_forward_equals_the_eager_model(progs, loaded, name, batch):
    eager, _ = progs[name]
    x = torch.randn(batch, *SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded[name].model(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, layer", [("r18", "layer4"), ("study", "blocks.2.conv.3"), ("study", "blocks.3")])
def test_hooks_on_named_layers_give_the_eager_layer_output_and_gradient(progs, loaded, name, layer):
    eager, _ = progs[name]
    m = loaded[name].model
    x = torch.randn(1, *SIZE)
    ran_after = []
    late = get_layer(m, "fc").register_forward_hook(lambda *a: ran_after.append(True))
    try:
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        got = run_to_layer(m, xs[0], get_layer(m, layer), stop=True)  # the hook raises: the forward ends there
        want = run_to_layer(eager, xs[1], get_layer(eager, layer), stop=True)
        assert not ran_after
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        got[0, :, 1, 1].sum().backward()  # the ERF engine's input gradient
        want[0, :, 1, 1].sum().backward()
        assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            full = run_to_layer(m, x, get_layer(m, layer), stop=False)
        assert ran_after and torch.allclose(full, want, atol=1e-5, rtol=1e-5)
    finally:
        late.remove()


def test_a_static_batch_or_size_is_reported_in_one_line(loaded):
    m = loaded["r18"].model
    assert m.input_shape == (1, 3, 64, 64)
    with pytest.raises(ErfLabError) as info:
        m(torch.randn(2, *SIZE))
    assert str(info.value) == ("this torch.export program takes inputs of shape [1, 3, 64, 64] (batch 1 static), "
                               "got [2, 3, 64, 64]")
    with pytest.raises(ErfLabError, match=re.escape("[1, 3, 64, 64] (batch 1 static), got [1, 3, 32, 32]")):
        m(torch.randn(1, 3, 32, 32))


def test_a_dynamic_batch_is_none_in_input_shape_and_its_range_is_reported(loaded):
    lm = loaded["r18_dyn"]
    assert lm.model.input_shape == (None, 3, 64, 64)
    assert lm.meta["input_shape"] == [None, 3, 64, 64]
    with pytest.raises(ErfLabError) as info:
        lm.model(torch.randn(9, *SIZE))
    assert str(info.value) == ("this torch.export program takes inputs of shape [N, 3, 64, 64] (batch N in 1..8), "
                               "got [9, 3, 64, 64]")
    with pytest.raises(ErfLabError, match=re.escape("got [2, 3, 64, 48]")) as info:
        lm.model(torch.randn(2, 3, 64, 48))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["r18", "r18_dyn", "study"])
def test_meta_input_size_is_the_programs(loaded, name):
    lm = loaded[name]
    assert lm.meta["input_size"] == [3, 64, 64] and lm.input_size == (3, 64, 64) and lm.in_channels == 3


@pytest.mark.parametrize("name", ["r18", "r18_dyn", "study"])
def test_theoretical_rf_equals_the_eager_models(progs, loaded, name):
    _rf_must_match_eager(loaded[name].model, progs[name][0])


@pytest.mark.parametrize("build, decompose", [
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), False),
    (lambda: models.create("resnet50_dw", op="conv", num_classes=10, small_input=True), False),
    (lambda: torchvision.models.resnet18(num_classes=10), True),
], ids=["mobilenet_v3_small", "resnet50_dw", "resnet18_core_aten"])
def test_theoretical_rf_equals_the_eager_models_more_architectures(tmp_path, build, decompose):
    """decompose: the inference IR of run_decompositions() (convolution, native batch norm with
    tuple outputs, max_pool2d_with_indices, mean.dim, addmm)."""
    eager = _randomise(build())
    ep = torch.export.export(eager, (torch.randn(1, *SIZE),))
    path = _save(ep.run_decompositions() if decompose else ep, tmp_path / "m.pt2")
    _rf_must_match_eager(load_model(path).model, eager)


def test_ops_without_a_rule_are_reported_not_taken_as_local(tmp_path, monkeypatch):
    """DK exported through the reference path (gathers, reshapes): rows say global + why, never a wrong local field."""
    monkeypatch.setenv("DK_OPS_BACKEND", "reference")
    eager = _randomise(models.create("study_net", op="dk", num_classes=10))
    ep = torch.export.export(eager, (torch.randn(1, *SIZE),))
    assert not any("dk_ops" in str(n.target) for n in ep.graph.nodes)
    got = theoretical_rf(load_model(_save(ep, tmp_path / "ref.pt2")).model, SIZE).set_index("layer")
    want = theoretical_rf(eager, SIZE).set_index("layer")
    flagged = 0
    for name in want.index:
        if got.loc[name, "global"] and not want.loc[name, "global"]:
            assert "changes the spatial grid" in got.loc[name, "notes"], name
            flagged += 1
        else:
            assert got.loc[name, RF_COLUMNS].tolist() == want.loc[name, RF_COLUMNS].tolist(), name
    assert got.loc["blocks.2.conv.3", "global"] and flagged > 0
    assert got.loc["blocks.1", RF_COLUMNS].tolist() == want.loc["blocks.1", RF_COLUMNS].tolist()  # before any DK layer


def test_a_program_exported_in_training_mode_is_flagged(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    path = _save(torch.export.export(net, (torch.randn(2, 3, 16, 16),)), tmp_path / "t.pt2")
    with pytest.warns(UserWarning, match="exported in training mode"):
        lm = load_model(path)
    assert lm.meta["exported_training"] and lm.model.exported_training
    rf = theoretical_rf(lm.model, (3, 16, 16)).set_index("layer")
    assert not rf.loc["0", "global"] and rf.loc["1", "global"] and "batch statistics" in rf.loc["1", "notes"]


def test_to_moves_tensor_constants_and_graph_devices(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):  # a device-bound arange and a lifted constant are burnt into the program
            y = self.conv(x)
            ramp = torch.arange(y.shape[-1], device=x.device, dtype=y.dtype)
            return y + ramp + torch.tensor([1.0, 2, 3, 4]).view(4, 1, 1)

    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    path = _save(torch.export.export(net, (x,)), tmp_path / "d.pt2")
    m = load_model(path).model
    assert torch.allclose(m(x), net(x), atol=1e-6)
    assert m.to("meta") is m and all(p.device.type == "meta" for p in m.parameters())
    y = m(torch.empty(1, 3, 8, 8, device="meta"))  # runs only if constants and device arguments moved too
    assert y.device.type == "meta" and y.shape == (1, 4, 8, 8)


def test_unregistered_operators_are_one_line(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    path = _save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), tmp_path / "ok.pt2")
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b'"torch.ops.aten.relu.default"', b'"torch.ops.no_such_lib.relu.default"')
            dst.writestr(info, data)
    with pytest.raises(ErfLabError, match=r"not registered here: no_such_lib::relu\.default") as info:
        load_model(bad)
    assert "\n" not in str(info.value)


def test_torchscript_loads_without_the_deprecation_warning(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scripting and saving warn; loading must not
        torch.jit.save(torch.jit.script(net), tmp_path / "m.ts")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(tmp_path / "m.ts")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    x = torch.randn(1, 1, 8, 8)
    assert lm.kind == "torchscript" and torch.allclose(lm.model(x), net(x))
