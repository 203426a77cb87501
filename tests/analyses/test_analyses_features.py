"""Feature extraction: layer resolution, GAP and box pooling, sampling, errors."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses.features import (
    Features,
    box_pool,
    box_to_grid,
    extract_features,
    feature_grid_mapping,
    resolve_layer,
)
from erf_lab.errors import ErfLabError


class BoxSet(torch.utils.data.Dataset):
    """A stand-in for erf_lab.data sets: fixed images, labels and boxes."""

    def __init__(self, images, labels, boxes, size_bins=None):
        self.images, self.boxes = images, boxes
        self.labels = np.asarray(labels, np.int64)
        self.size_bins = np.zeros(len(images), np.int64) if size_bins is None else np.asarray(size_bins, np.int64)
        self.sizes = np.sqrt(boxes[:, 2].numpy() * boxes[:, 3].numpy()).astype(np.float64)
        self.class_names = [f"c{i}" for i in range(int(self.labels.max()) + 1)]
        self.size_bin_edges = None
        self.spec = "standin"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i]), "box": self.boxes[i],
                "size_bin": int(self.size_bins[i]), "index": i}


def _strided_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()


def _identity_net(channels=1):
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return nn.Sequential(conv).eval()


def test_box_pooling_of_the_whole_image_is_global_average_pooling():
    torch.manual_seed(1)
    n, h, w = 12, 40, 28
    images = torch.randn(n, 3, h, w)
    boxes = torch.tensor([[0.0, 0.0, w, h]]).repeat(n, 1)
    ds = BoxSet(images, np.arange(n) % 3, boxes)
    net = _strided_net()
    gap = extract_features(net, ds, layer="3", pooling="gap", batch_size=5, device="cpu", progress=False)
    box = extract_features(net, ds, layer="3", pooling="box", batch_size=5, device="cpu", progress=False)
    mapping = box.meta["box_mapping"]
    assert mapping["source"] == "theoretical receptive field" and mapping["stride"] == [4.0, 4.0]
    assert mapping["center0"] != [1.5, 1.5]  # padded convs: the grid is not the naive size-ratio grid
    np.testing.assert_allclose(box.features, gap.features, rtol=1e-5, atol=1e-6)
    assert gap.features.shape == (n, 16)
    # and the GAP features are what the layer's map averages to
    with torch.no_grad():
        ref = net[:4](images).mean((2, 3)).numpy()
    np.testing.assert_allclose(gap.features, ref, rtol=1e-5, atol=1e-6)


def test_box_pooling_reads_inside_the_box_only():
    img = torch.zeros(1, 1, 32, 32)
    img[..., :16] = 1.0  # left half bright
    ds = BoxSet(img, [0], torch.tensor([[0.0, 0.0, 16.0, 32.0]]))
    f = extract_features(_identity_net(), ds, layer="0", pooling="box", device="cpu", progress=False)
    # x interval [-0.5, 15.5] (the left edge is on the image border); the interpolant is 1 up to
    # centre 15 and falls linearly to 0 at centre 16: (15.5 + 0.5 - 0.125) / 16
    assert f.features[0, 0] == pytest.approx(15.875 / 16, abs=1e-6)
    far = BoxSet(img, [0], torch.tensor([[20.0, 4.0, 8.0, 8.0]]))
    assert extract_features(_identity_net(), far, layer="0", pooling="box", device="cpu", progress=False).features[0, 0] == 0


def test_box_pool_is_exact_on_constant_and_linear_maps():
    ramp_x = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 6, 10)
    ramp_y = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 1, 6, 10)
    fmap = torch.cat([torch.full((1, 1, 6, 10), 3.0), ramp_x, ramp_y], 1).double()
    boxes = torch.tensor([[0.7, 4.2, 1.1, 8.6]], dtype=torch.float64)  # [y0, y1, x0, x1] between outer centres
    out = box_pool(fmap, boxes)[0]
    assert out.tolist() == pytest.approx([3.0, (1.1 + 8.6) / 2, (0.7 + 4.2) / 2])


@settings(max_examples=60, deadline=None)
@given(y0=st.floats(-0.5, 4.5), dy=st.floats(0.01, 5.0), x0=st.floats(-0.5, 2.5), dx=st.floats(0.01, 3.0))
def test_box_pool_weights_are_a_mean(y0, dy, x0, dx):
    y1, x1 = min(y0 + dy, 4.5), min(x0 + dx, 2.5)
    if y1 - y0 < 1e-3 or x1 - x0 < 1e-3:
        return
    boxes = torch.tensor([[y0, y1, x0, x1]], dtype=torch.float64)
    ones = torch.ones(1, 1, 5, 3, dtype=torch.float64)
    assert box_pool(ones, boxes).item() == pytest.approx(1.0, abs=1e-9)
    fmap = torch.rand(1, 2, 5, 3, dtype=torch.float64)
    v = box_pool(fmap, boxes)
    assert (v >= fmap.amin((2, 3)) - 1e-12).all() and (v <= fmap.amax((2, 3)) + 1e-12).all()


def test_box_to_grid_maps_pixels_with_stride_and_centre():
    grid = box_to_grid(torch.tensor([[16.0, 8.0, 8.0, 16.0], [0.0, 0.0, 64.0, 64.0]]), (64, 64), (8, 8), (8, 8), (3.5, 3.5))
    # pixel-centre coordinate p maps to (p - 3.5) / 8; edges x = 16 -> centre 15.5 -> 1.5
    assert grid[0].tolist() == pytest.approx([0.5, 2.5, 1.5, 2.5])
    assert grid[1].tolist() == pytest.approx([-0.5, 7.5, -0.5, 7.5])


def test_default_layer_is_the_last_convolutional_stage():
    from dk_ops import models

    net = models.create("study_net", num_classes=10).eval()
    name, _, shape = resolve_layer(net, None, torch.zeros(1, 3, 64, 64))
    assert name == "blocks" and shape == (1, 64, 4, 4)  # effective stride 16
    name, _, shape = resolve_layer(_strided_net(), None, torch.zeros(1, 3, 32, 32))
    assert name == "3" and shape == (1, 16, 8, 8)  # not the 1x1 adaptive pool after it


def test_bad_layer_name_lists_close_matches():
    from collections import OrderedDict

    net = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3), stage1=nn.Conv2d(4, 4, 3), head=nn.Flatten())).eval()
    with pytest.raises(ErfLabError) as exc:
        resolve_layer(net, "stage2", torch.zeros(1, 3, 16, 16))
    msg = str(exc.value)
    assert "'stage2'" in msg and "did you mean stage1" in msg and "\n" not in msg


def test_layer_without_a_spatial_map_is_refused():
    with pytest.raises(ErfLabError, match=r"layer '6' outputs shape \[1, 4\], not a spatial map") as exc:
        resolve_layer(_strided_net(), "6", torch.zeros(1, 3, 32, 32))
    assert "\n" not in str(exc.value)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    ds = BoxSet(torch.zeros(4, 3, 8, 8), [0, 1, 0, 1], torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(4, 1))
    with pytest.raises(ErfLabError, match="no layer with a spatial map"):
        extract_features(mlp, ds, device="cpu", progress=False)


def test_untraceable_model_falls_back_to_the_size_ratio():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 2, stride=2)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
                x = x * 0
            return self.conv(x)

    mapping = feature_grid_mapping(Branchy().eval(), "conv", (3, 16, 16), (8, 8))
    assert mapping["stride"] == (2.0, 2.0) and mapping["center0"] == (0.5, 0.5)
    assert mapping["source"].startswith("size ratio")


def test_max_samples_is_stratified_and_metadata_is_kept(tmp_path):
    n = 60
    labels = np.array([0] * 30 + [1] * 20 + [2] * 10)
    images = torch.rand(n, 3, 8, 8)
    boxes = torch.tensor([[1.0, 1.0, 4.0, 4.0]]).repeat(n, 1)
    f = extract_features(_identity_net(3), BoxSet(images, labels, boxes), max_samples=30, seed=2, device="cpu",
                         progress=False)
    assert len(f) == 30 and np.bincount(f.labels).tolist() == [15, 10, 5]
    np.testing.assert_allclose(f.features, images[f.indices].mean((2, 3)).numpy(), rtol=1e-6)
    assert f.meta["layer"] == "0" and f.meta["sampling"].startswith("stratified") and f.meta["seed"] == 2
    assert np.allclose(f.sizes, 4.0)
    f.save(tmp_path / "feat")
    g = Features.load(tmp_path / "feat.npz")
    assert np.array_equal(g.features, f.features) and g.class_names == f.class_names and g.meta == f.meta


def test_unknown_pooling_is_refused():
    ds = BoxSet(torch.zeros(2, 1, 4, 4), [0, 1], torch.zeros(2, 4))
    with pytest.raises(ErfLabError, match="pooling must be one of gap, box"):
        extract_features(_identity_net(), ds, pooling="roi", progress=False)
