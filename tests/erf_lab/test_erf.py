"""The ERF engine against independent oracles: analytic box-kernel stacks, Luo et al.'s sqrt(depth)
law, a per-image autograd loop, captum's NeuronGradient, and plain restatements of the presets."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dk_ops.modules import CondConv2d, DeformKernel2d
from erf_lab import ERFResult, compute_erf
from erf_lab.erf import PRESETS
from erf_lab.erf.engine import Engine
from erf_lab.erf.geometry import crop_window, geometry
from erf_lab.erf.locality import check_locality
from erf_lab.erf.sampling import ImageSource, select_images
from erf_lab.errors import ErfLabError
from erf_lab.metrics import second_moments


def box_stack(n: int, k: int) -> nn.Sequential:
    layers = [nn.Conv2d(1, 1, k, padding=k // 2, bias=False) for _ in range(n)]
    for layer in layers:
        nn.init.ones_(layer.weight)
    return nn.Sequential(*layers)


def nfold_box(n: int, k: int) -> np.ndarray:
    p = np.ones(1)
    for _ in range(n):
        p = np.convolve(p, np.ones(k))
    return p


@pytest.mark.parametrize("n,k", [(1, 3), (4, 3), (3, 5), (6, 3)])
def test_box_stack_equals_nfold_convolution(n, k):
    size = 2 * n * (k // 2) + 9
    r = compute_erf(box_stack(n, k), torch.randn(3, 1, size, size), preset="luo", progress=False)
    c = size // 2
    half = n * (k // 2)
    expect = np.zeros((size, size))
    p = nfold_box(n, k)
    expect[c - half : c + half + 1, c - half : c + half + 1] = np.outer(p, p)
    assert np.abs(r.map / r.map.sum() - expect / expect.sum()).max() < 1e-9
    sy, sx = second_moments(r.map, r.center)
    sigma = math.sqrt(n * (k * k - 1) / 12)
    assert sy == pytest.approx(sigma, rel=1e-9) and sx == pytest.approx(sigma, rel=1e-9)
    assert r.meta["rf_size"] == [2 * half + 1] * 2 and r.meta["rf_center"] == [c, c]


@pytest.mark.parametrize("rectify", ["square", "abs"])
def test_random_linear_stacks_grow_as_sqrt_depth(rectify):
    depths, sigmas = [4, 8, 16, 32], []
    for n in depths:
        layers = [nn.Conv2d(1 if i == 0 else 16, 16, 3, padding=1, bias=False) for i in range(n)]
        for layer in layers:
            nn.init.normal_(layer.weight)
        r = compute_erf(nn.Sequential(*layers), torch.zeros(1, 1, 97, 97), preset="luo", grad_rectify=rectify, progress=False)
        sy, sx = second_moments(r.map, r.center)
        sigmas.append(math.sqrt(sy * sx))
    slope = np.polyfit(np.log(depths), np.log(sigmas), 1)[0]
    assert 0.4 < slope < 0.65, slope  # Luo et al. 2016 report 0.56


class SmallNet(nn.Module):
    """conv-bn-relu, a strided conv, a residual 3x3, with BatchNorm running stats that matter."""

    def __init__(self, c_in: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-0.5, 0.5)
            self.stem[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.down(self.stem(x))
        x = x + F.relu(self.block(x))
        return self.head(x.mean((2, 3)))


def per_image_oracle(model, images, layer, unit, options):
    """A plain loop: one image at a time, full forward, autograd, numpy reductions."""
    maps = []
    model.eval()
    feats = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: feats.__setitem__("y", o))
    for img in images:
        x = img[None].clone().requires_grad_(True)
        model(x)
        v = feats["y"][0, :, unit[0], unit[1]]
        if options.target_rectify == "relu":
            v = F.relu(v)
        t = v.sum() if options.target_reduction == "sum" else v.mean()
        (g,) = torch.autograd.grad(t, x)
        g = g[0].double().numpy()
        if options.grad_rectify == "relu":
            g = np.maximum(g, 0)
        m = g.sum(0) if options.color_reduction == "sum" else g.mean(0)
        if options.map_rectify == "clamp":
            m = np.maximum(m, 0)
        maps.append(m)
    handle.remove()
    return np.mean(maps, 0)


@pytest.mark.parametrize("preset", ["replknet", "luo", "openerf"])
def test_batched_equals_per_image_loop(preset):
    model, images = SmallNet(), torch.randn(7, 3, 24, 24)
    r = compute_erf(model, images, layer="block", unit=(5, 6), preset=preset, batch_size=3, progress=False)
    oracle = per_image_oracle(model, images, "block", (5, 6), PRESETS[preset])
    np.testing.assert_allclose(r.map, oracle, rtol=1e-5, atol=1e-7 * np.abs(oracle).max())
    assert r.n_images == 7 and r.n_skipped == 0


def test_batch_size_does_not_change_the_map():
    model, images = SmallNet(), torch.randn(6, 3, 24, 24)
    a = compute_erf(model, images, layer="block", batch_size=1, progress=False)
    b = compute_erf(model, images, layer="block", batch_size=6, progress=False)
    np.testing.assert_allclose(a.map, b.map, rtol=1e-6, atol=1e-12)


def test_captum_backend_equals_engine():
    model, images = SmallNet(), torch.randn(5, 3, 20, 20)
    a = compute_erf(model, images, layer="block", unit=(4, 3), batch_size=2, progress=False)
    b = compute_erf(model, images, layer="block", unit=(4, 3), batch_size=2, backend="captum", progress=False)
    np.testing.assert_allclose(a.map, b.map, rtol=1e-6, atol=1e-12)
    assert b.meta["backend"] == "captum"


def test_replknet_preset_equals_restatement_of_their_script():
    """RepLKNet erf/visualize_erf.py: batch 1, relu(out[:, :, H//2, W//2]).sum(), relu(grad).sum((0, 1)),
    NaN check per image, running mean; analyze_erf.py: log10(x + 1) / max and get_rectangle."""
    torch.manual_seed(1)
    features = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(6, 4, 3, padding=1))
    images = torch.randn(4, 3, 33, 33)
    total, count = None, 0
    for img in images:
        samples = img[None].clone().requires_grad_(True)
        outputs = features(samples)
        out_size = outputs.size()
        central_point = F.relu(outputs[:, :, out_size[2] // 2, out_size[3] // 2]).sum()
        grad = torch.autograd.grad(central_point, samples)[0]
        grad = F.relu(grad)
        contribution_scores = grad.sum((0, 1)).numpy().astype(np.float64)
        if np.isnan(np.sum(contribution_scores)):
            continue
        total = contribution_scores if total is None else total + contribution_scores
        count += 1
    theirs = total / count

    def get_rectangle(data, thresh):
        h, w = data.shape
        all_sum = np.sum(data)
        for i in range(1, h // 2):
            selected_area = data[h // 2 - i : h // 2 + 1 + i, w // 2 - i : w // 2 + 1 + i]
            if np.sum(selected_area) / all_sum > thresh:
                return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
        return None

    ours = compute_erf(features, images, unit=(8, 8), preset="replknet", center="array", progress=False, crop=False)
    np.testing.assert_allclose(ours.map, theirs, rtol=1e-5)
    data = np.log10(theirs + 1)
    data = data / np.max(data)
    np.testing.assert_allclose(ours.display(), data, rtol=1e-5)
    m = ours.metrics()
    for t in (0.2, 0.3, 0.5, 0.99):
        assert m[f"area_ratio_replknet_array_center@{t}"] == pytest.approx(get_rectangle(data, t)[1])


def test_center_unit_uses_the_receptive_field_not_the_array_middle():
    # 4 output cells over 16 px with 'valid' stride-4 kernel 4: centres at 1.5, 5.5, 9.5, 13.5 and the
    # image centre 7.5 lies between cells 1 and 2; a left-heavy padding shifts it.
    net = nn.Sequential(nn.ZeroPad2d((6, 0, 6, 0)), nn.Conv2d(1, 1, 4, stride=4))
    r = compute_erf(net, torch.randn(1, 1, 16, 16), progress=False)
    # grid 5x5 (22/4 -> 5), unit i centred at -6 + 1.5 + 4 i: i=3 -> 7.5
    assert r.meta["grid"] == [5, 5] and r.meta["unit"] == [3, 3] and r.meta["rf_center"] == [7.5, 7.5]


def test_several_units_in_one_pass_equal_separate_runs():
    model, images = SmallNet(), torch.randn(3, 3, 24, 24)
    both = compute_erf(model, images, layer="block", unit=[(2, 2), (9, 7)], progress=False)
    for res, u in zip(both, [(2, 2), (9, 7)]):
        one = compute_erf(model, images, layer="block", unit=u, progress=False)
        # different crops run different float32 kernels: agreement to float32 precision
        np.testing.assert_allclose(res.map, one.map, rtol=1e-5, atol=1e-6 * np.abs(one.map).max())
        assert res.meta["unit"] == list(u)


def test_compute_erfs_always_returns_a_list_in_unit_order():
    from erf_lab.erf import compute_erfs

    model, images = SmallNet(), torch.randn(3, 3, 24, 24)
    one = compute_erfs(model, images, [(9, 7)], layer="block", progress=False)
    assert isinstance(one, list) and len(one) == 1 and one[0].meta["unit"] == [9, 7]
    single = compute_erf(model, images, layer="block", unit=(9, 7), progress=False)
    np.testing.assert_array_equal(one[0].map, single.map)  # the same unit, the same crop: the same map
    two = compute_erfs(model, images, [(2, 2), (9, 7)], layer="block", progress=False)
    assert [r.meta["unit"] for r in two] == [[2, 2], [9, 7]]
    with pytest.raises(ErfLabError, match="non-empty list"):
        compute_erfs(model, images, [], layer="block", progress=False)


def test_nonfinite_maps_are_skipped_and_counted():
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.sqrt(x))

    images = torch.rand(5, 1, 12, 12) + 0.1
    images[2, 0, 6, 6] = -1.0  # NaN inside the centre unit's field
    model = Sqrt()
    r = compute_erf(model, images, unit=(6, 6), preset="luo", batch_size=2, progress=False)
    assert (r.n_images, r.n_skipped) == (4, 1)
    good = compute_erf(model, images[[0, 1, 3, 4]], unit=(6, 6), preset="luo", progress=False)
    np.testing.assert_allclose(r.map, good.map, rtol=1e-6)


def test_crop_is_used_only_when_locality_is_proven_and_gives_the_same_map():
    torch.manual_seed(2)
    local = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    images = torch.randn(3, 3, 64, 64)
    a = compute_erf(local, images, progress=False)
    b = compute_erf(local, images, crop=False, progress=False)
    assert a.meta["crop"] is not None and a.meta["locality"].startswith("verified")
    assert b.meta["crop"] is None
    np.testing.assert_allclose(a.map, b.map, rtol=1e-5, atol=1e-9 * np.abs(b.map).max())
    routed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CondConv2d(4, 4, 3, padding=1))
    nn.init.normal_(routed[1].routing.weight)
    c = compute_erf(routed, images, progress=False)
    assert c.meta["crop"] is None and "not provably local" in c.meta["locality"]


def test_empirical_locality_check_catches_global_routing():
    routed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CondConv2d(4, 4, 3, padding=1)).eval()
    nn.init.normal_(routed[1].routing.weight)
    local = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DeformKernel2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(3, 48, 48)
    for model, expect in ((routed, False), (local, True)):
        geo = geometry(model, None, None, "auto", None, "center", x)
        geo.local = True  # pretend the graph said "local": the empirical check must still decide
        window = crop_window(geo, (48, 48))
        engine = Engine(model, None, None, geo, PRESETS["replknet"], True)
        assert check_locality(engine, x, window, seed=0) is expect


def test_layouts_nhwc_tokens_and_tuple_outputs_agree_with_nchw():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 6))
            self.nhwc = nn.Identity()
            self.tokens = nn.Identity()
            self.pair = PairOut()

        def forward(self, x):
            y = self.conv(x)
            self.nhwc(y.permute(0, 2, 3, 1))
            t = torch.cat([self.cls.expand(len(x), -1, -1), y.flatten(2).transpose(1, 2)], 1)
            self.tokens(t)
            return self.pair(y)

    class PairOut(nn.Module):
        def forward(self, y):
            return {"aux": y.sum(), "map": y * 2}

    model, images = Wrap(), torch.randn(2, 3, 32, 32)
    ref = compute_erf(model, images, layer="conv", unit=(3, 5), preset="luo", progress=False)
    nhwc = compute_erf(model, images, layer="nhwc", layout="nhwc", unit=(3, 5), preset="luo", progress=False)
    tok = compute_erf(model, images, layer="tokens", unit=(3, 5), preset="luo", progress=False)
    pair = compute_erf(model, images, layer="pair", output_index="map", unit=(3, 5), preset="luo", progress=False)
    np.testing.assert_allclose(nhwc.map, ref.map, rtol=1e-6)
    np.testing.assert_allclose(tok.map, ref.map, rtol=1e-6)
    np.testing.assert_allclose(pair.map, 2 * ref.map, rtol=1e-6)
    assert tok.meta["layout"] == "tokens" and tok.meta["prefix_tokens"] == 1 and tok.meta["grid"] == [8, 8]


def test_sampling_is_seeded_and_stratified():
    class Labelled(torch.utils.data.Dataset):
        labels = np.array([0] * 10 + [1] * 3 + [2] * 7)

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {"image": torch.full((1, 4, 4), float(i)), "label": int(self.labels[i])}

    src = ImageSource(Labelled())
    assert select_images(src, 6, "random", 3) == select_images(src, 6, "random", 3)
    assert select_images(src, 6, "random", 3) != select_images(src, 6, "random", 4)
    picked = select_images(src, 9, "stratified", 0)
    assert sorted(np.bincount(Labelled.labels[picked])) == [3, 3, 3]
    a = compute_erf(nn.Conv2d(1, 1, 3, padding=1), Labelled(), num_images=5, seed=1, progress=False)
    b = compute_erf(nn.Conv2d(1, 1, 3, padding=1), [(torch.full((1, 4, 4), float(i)), 0) for i in range(20)],
                    num_images=5, seed=1, progress=False)
    assert a.n_images == b.n_images == 5


def test_bad_inputs_raise_one_line_errors():
    model = SmallNet()
    x = torch.randn(2, 3, 16, 16)
    cases = [
        dict(layer="blok"),
        dict(layer="block", unit=(99, 0)),
        dict(preset="nope"),
        dict(layer="head"),  # (N, 5): no spatial map
        dict(grad_rectify="cube"),
        dict(backend="other"),
    ]
    for kw in cases:
        with pytest.raises(ErfLabError) as info:
            compute_erf(model, x, progress=False, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ErfLabError, match="did you mean block"):
        compute_erf(model, x, layer="blok", progress=False)
    with pytest.raises(ErfLabError, match="differ in size"):
        compute_erf(model, [torch.randn(3, 16, 16), torch.randn(3, 18, 18)], layer="block", batch_size=1, progress=False)
    with pytest.raises(ErfLabError, match="empty"):
        compute_erf(model, torch.randn(0, 3, 16, 16), layer="block", progress=False)


def test_model_state_is_restored():
    model = SmallNet().train()
    before = [p.requires_grad for p in model.parameters()]
    compute_erf(model, torch.randn(2, 3, 16, 16), layer="block", progress=False, channels_last=True)
    assert model.training and [p.requires_grad for p in model.parameters()] == before
    assert all(p.is_contiguous() for p in model.parameters())


def test_result_save_load_roundtrip_and_plot(tmp_path):
    r = compute_erf(SmallNet(), torch.randn(3, 3, 24, 24), layer="block", progress=False)
    r.image = np.random.rand(24, 24, 3)
    r.save(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["erf.json", "erf.npz", "erf.png", "erf_overlay.png"]
    back = ERFResult.load(tmp_path / "out")
    np.testing.assert_array_equal(back.map, r.map)
    assert back.n_images == 3 and back.meta["unit"] == r.meta["unit"] and back.image.shape == (24, 24, 3)
    assert back.metrics()["sigma_y"] == pytest.approx(r.metrics()["sigma_y"])
    with np.load(tmp_path / "out" / "erf.npz") as z:
        assert z["erf"].dtype == np.float64 and z["erf"].shape == (24, 24)
    import matplotlib

    matplotlib.use("Agg")
    ax = r.plot(overlay=True)
    assert ax.get_title().startswith("ERF block")


def test_interrupted_save_leaves_no_partial_files(tmp_path, monkeypatch):
    r = compute_erf(SmallNet(), torch.randn(2, 3, 16, 16), layer="block", progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        r.save(tmp_path / "o", plot=False)
    assert os.listdir(tmp_path / "o") == []


def test_default_layer_of_a_classifier_is_its_last_spatial_layer():
    r = compute_erf(SmallNet(), torch.randn(2, 3, 16, 16), progress=False)
    assert r.meta["layer"] == "block" and "last spatial layer" in r.meta["layer_note"]
    conv = nn.Conv2d(3, 2, 3, padding=1)
    r = compute_erf(conv, torch.randn(2, 3, 16, 16), progress=False)
    assert r.meta["layer"] == "" and r.meta["layer_note"] == ""


class Block(nn.Module):
    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.skip = nn.Conv2d(c, c, 1, stride=stride)
        self.relu = nn.ReLU()  # shared: called twice, so never a crop point itself

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.skip(x))


def test_cone_pruning_matches_the_plain_computation():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(4, 2), Block(4, 1), Block(4, 2), Block(4, 1))
    images = torch.randn(3, 3, 96, 96)
    pruned = compute_erf(net, images, layer="4", unit=[(11, 12), (12, 12)], progress=False)
    plain = compute_erf(net, images, layer="4", unit=[(11, 12), (12, 12)], crop=False, progress=False)
    for a, b in zip(pruned, plain):
        assert "cropped to the unit's cone (verified)" in a.meta["cone"] and b.meta["cone"] == "off"
        np.testing.assert_allclose(a.map, b.map, rtol=1e-5, atol=1e-6 * np.abs(b.map).max())
        assert (a.map[b.map == 0] == 0).all()
    from erf_lab.erf.cone import plan_cone
    from erf_lab.rf import trace_rf

    g = trace_rf(net, (3, 96, 96))
    names = [n for n, _ in plan_cone(g, "4", None, g.of("4"))]
    assert names == ["0", "1", "2", "3"]  # block outputs dominate; the shared ReLUs and branch convs do not


class SqueezeExcite(nn.Module):
    """Channel gates from global average pooling: every unit depends on the whole image."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def _stem(c: int = 4) -> list:
    return [nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, stride=2), nn.ReLU()]


def test_se_block_feeding_the_target_falls_back_to_the_full_image():
    torch.manual_seed(4)
    net = nn.Sequential(*_stem(), SqueezeExcite(4), nn.Conv2d(4, 4, 3, padding=1))
    images = torch.randn(2, 3, 64, 64)
    r = compute_erf(net, images, progress=False)
    full = compute_erf(net, images, crop=False, progress=False)
    assert r.meta["crop"] is None and r.meta["locality"].startswith("not provably local")
    np.testing.assert_allclose(r.map, full.map, rtol=1e-6, atol=1e-12)
    assert (np.abs(r.map[:8]) > 0).any()  # the gate's gradient reaches far outside the 3-conv field


@pytest.mark.parametrize("hidden", ["groupnorm", "se_leaf"])
def test_numeric_check_catches_global_ops_the_graph_cannot_see(hidden, monkeypatch):
    """GroupNorm with the graph's normalisation rule switched off (so it looks like a pointwise
    torch.nn leaf) and an SE block traced as a leaf both look local to the graph; the first-batch
    check must reject the crop and the cone, and the map must equal the full-image one."""
    import erf_lab.rf as rf_mod

    if hidden == "se_leaf":
        leaves = rf_mod._leaf_types()
        monkeypatch.setattr(rf_mod, "_leaf_types", lambda: leaves + (SqueezeExcite,))
        mid = SqueezeExcite(4)
    else:
        monkeypatch.setattr(rf_mod, "_statistics_norm", lambda *args: "")
        mid = nn.GroupNorm(2, 4)
    torch.manual_seed(5)
    net = nn.Sequential(*_stem(), Block(4, 1), mid, Block(4, 1), nn.Conv2d(4, 4, 3, padding=1))
    images = torch.randn(3, 3, 96, 96)
    r = compute_erf(net, images, layer="6", progress=False)
    full = compute_erf(net, images, layer="6", crop=False, progress=False)
    assert r.meta["crop"] is None and r.meta["locality"] == "empirical locality check failed: full image"
    assert r.meta["cone"].startswith("off")
    np.testing.assert_allclose(r.map, full.map, rtol=1e-5, atol=1e-6 * np.abs(full.map).max())


def test_groupnorm_is_global_to_the_graph():
    torch.manual_seed(5)
    net = nn.Sequential(*_stem(), Block(4, 1), nn.GroupNorm(2, 4), Block(4, 1), nn.Conv2d(4, 4, 3, padding=1))
    r = compute_erf(net, torch.randn(2, 3, 96, 96), layer="6", progress=False)
    assert r.meta["crop"] is None and r.meta["locality"].startswith("not provably local")


def test_numeric_check_passes_on_a_local_residual_net_and_costs_no_crop_pass(monkeypatch):
    """The local twin of the nets above: crop and cone are verified, the map equals the full-image
    one, and the check adds exactly one batch-1 forward (the reference) to the run."""
    import erf_lab.erf.locality as locality

    torch.manual_seed(5)
    net = nn.Sequential(*_stem(), Block(4, 1), nn.Identity(), Block(4, 1), nn.Conv2d(4, 4, 3, padding=1))
    images = torch.randn(5, 3, 96, 96)
    calls = []
    real = locality.reference
    monkeypatch.setattr(locality, "reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    forwards = []
    handle = net.register_forward_pre_hook(lambda m, i: forwards.append(tuple(i[0].shape)))
    try:
        r = compute_erf(net, images, layer="6", batch_size=2, progress=False)
    finally:
        handle.remove()
    full = compute_erf(net, images, layer="6", crop=False, progress=False)
    assert r.meta["crop"] is not None and r.meta["locality"].startswith("verified")
    assert "(verified)" in r.meta["cone"]
    assert len(calls) == 1
    ya, xa, yb, xb = r.meta["crop"]
    crop_shape = (yb - ya, xb - xa)
    # 3 gradient batches on the crop + 1 reference on the crop framed by noise; nothing on the full image
    assert [f[-2:] == crop_shape for f in forwards].count(True) == 3 and len(forwards) == 4
    assert all(f[-2:] != (96, 96) for f in forwards)
    np.testing.assert_allclose(r.map, full.map, rtol=1e-5, atol=1e-6 * np.abs(full.map).max())


@pytest.mark.parametrize("size", [17, 64])
def test_float64_model_is_analysed_in_float64(size):
    """A float64 box stack (weights 1/3, not exact in float32): the map is the analytic product of
    n-fold box convolutions to 1e-12, with and without the crop."""
    n, k = 4, 3
    net = box_stack(n, k).double()
    for layer in net:
        nn.init.constant_(layer.weight, 1 / 3)
    r = compute_erf(net, torch.randn(2, 1, size, size, dtype=torch.float64), preset="luo", progress=False)
    assert r.meta["dtype"] == "float64"
    cy, cx = (int(v) for v in r.meta["rf_center"])
    half = n * (k // 2)
    expect = np.zeros((size, size))
    p = nfold_box(n, k)
    expect[cy - half : cy + half + 1, cx - half : cx + half + 1] = np.outer(p, p) / 3.0**n  # each 3x3 tap is 1/3
    assert np.abs(r.map - expect).max() < 1e-12 * np.abs(expect).max()
    assert (r.meta["crop"] is not None) is (size == 64)
    with pytest.raises(AssertionError):  # the same model in float32 is only float32-accurate
        r32 = compute_erf(net.float(), torch.randn(2, 1, size, size), preset="luo", progress=False)
        assert np.abs(r32.map - expect).max() < 1e-12 * np.abs(expect).max()


# ---------------------------------------------------------------------------------------------
# speed-ups that must not change the map: batch-norm folding, the crop's backward, auto batches


class ConvBNNet(nn.Module):
    """Conv-BN-ReLU pairs with running statistics and affine parameters far from the identity,
    a residual block, and a conv whose BN the engine must not fold when it is the target."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1 = nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.bn3 = nn.BatchNorm2d(6)
        torch.manual_seed(11)
        with torch.no_grad():
            for bn in (self.stem[1], self.bn1, self.bn2, self.bn3):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.2, 3.0)
                bn.weight.uniform_(-2, 2)
                bn.bias.uniform_(-1, 1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = y + F.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


def test_batchnorm_folding_gives_the_oracle_map_and_restores_the_model():
    net = ConvBNNet().eval()
    images = torch.randn(4, 3, 40, 40)
    modules = dict(net.named_modules())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    r = compute_erf(net, images, layer="bn3", unit=(9, 11), progress=False)
    oracle = per_image_oracle(net, images, "bn3", (9, 11), PRESETS["replknet"])
    np.testing.assert_allclose(r.map, oracle, rtol=1e-5, atol=1e-6 * np.abs(oracle).max())
    assert r.meta["bn_folded"] == 3  # stem, bn1, bn2; bn3 is the target
    assert dict(net.named_modules()) == modules  # the very same module objects, BN included
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    unfolded = compute_erf(net, images, layer="bn3", unit=(9, 11), fold_bn=False, progress=False)
    assert unfolded.meta["bn_folded"] == 0
    np.testing.assert_allclose(r.map, unfolded.map, rtol=1e-5, atol=1e-6 * np.abs(oracle).max())


@pytest.mark.parametrize("layer,expected", [("conv3", 3), ("conv2", 3), ("bn2", 3)])
def test_folding_leaves_the_target_pair_alone(layer, expected):
    """A conv whose BN follows it is the target: its raw output must be seen, not conv+BN (the
    oracle hooks the unfolded conv). The other three pairs fold (those after the target never run)."""
    net = ConvBNNet().eval()
    images = torch.randn(3, 3, 32, 32)
    r = compute_erf(net, images, layer=layer, unit=(7, 8), progress=False)
    oracle = per_image_oracle(net, images, layer, (7, 8), PRESETS["replknet"])
    np.testing.assert_allclose(r.map, oracle, rtol=1e-5, atol=1e-6 * np.abs(oracle).max())
    assert r.meta["bn_folded"] == expected


def test_folding_skips_hooked_modules_and_their_hooks_still_fire():
    net = ConvBNNet().eval()
    seen = []
    handle = net.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        r = compute_erf(net, torch.randn(2, 3, 32, 32), layer="bn3", progress=False, crop=False)
    finally:
        handle.remove()
    assert r.meta["bn_folded"] == 2 and seen  # bn1 kept, so its hook saw the run


def test_folding_keeps_batch_statistics_norms():
    net = ConvBNNet().eval()
    net.bn1.track_running_stats, net.bn1.running_mean, net.bn1.running_var = False, None, None
    images = torch.randn(3, 3, 32, 32)
    r = compute_erf(net, images, layer="bn3", unit=(7, 8), progress=False)
    assert r.meta["bn_folded"] == 2


def test_crop_backward_pads_in_the_input_memory_format():
    from erf_lab.erf.cone import _Crop

    x = torch.randn(2, 3, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _Crop.apply(t, 2, 7, 1, 5), (x,))
    y = _Crop.apply(x, 2, 7, 1, 5)
    w = torch.randn(y.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert g.is_contiguous(memory_format=torch.channels_last)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    expected[:, :, 2:7, 1:5] = w
    assert torch.equal(g, expected)


def test_auto_batch_shrinks_when_the_crop_falls_back_to_whole_images(monkeypatch):
    """The crop's auto batch (many small crops) must not be used for whole images after the
    locality check fails; every image is still counted once and the map is the full-image one."""
    import erf_lab.erf.memory as memory
    import erf_lab.rf as rf_mod

    monkeypatch.setattr(rf_mod, "_statistics_norm", lambda *args: "")  # hide GroupNorm from the graph
    monkeypatch.setattr(memory, "CPU_BATCH_PIXELS", 4 * 96 * 96)
    torch.manual_seed(5)
    net = nn.Sequential(*_stem(), Block(4, 1), nn.GroupNorm(2, 4), Block(4, 1), nn.Conv2d(4, 4, 3, padding=1))
    images = torch.randn(10, 3, 96, 96)
    batches = []
    handle = net.register_forward_pre_hook(lambda m, i: batches.append(tuple(i[0].shape)))
    try:
        r = compute_erf(net, images, layer="6", progress=False)
    finally:
        handle.remove()
    assert r.meta["locality"] == "empirical locality check failed: full image" and r.n_images == 10
    full = [b[0] for b in batches if b[-2:] == (96, 96)]
    assert max(full) <= 4 and sum(full) >= 10  # whole-image batches of at most 4 cover all ten images
    ref = compute_erf(net, images, layer="6", crop=False, batch_size=3, progress=False)
    np.testing.assert_allclose(r.map, ref.map, rtol=1e-5, atol=1e-6 * np.abs(ref.map).max())


def test_auto_batch_size_targets_pixels_per_batch():
    from erf_lab.erf import CPU_BATCH_PIXELS, auto_batch_size

    assert auto_batch_size("cpu", (224, 224)) * 224 * 224 <= CPU_BATCH_PIXELS < (auto_batch_size("cpu", (224, 224)) + 1) * 224 * 224
    assert auto_batch_size("cpu", (4096, 4096)) == 1 and auto_batch_size("cpu", (8, 8)) == 64
    with pytest.raises(ErfLabError, match="batch_size"):
        compute_erf(SmallNet(), torch.randn(2, 3, 16, 16), layer="block", batch_size=0, progress=False)
