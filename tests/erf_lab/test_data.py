"""erf_lab.data: the digits-ms generator, size bins, noise, and the open_data grammar."""
import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from erf_lab.data import open_data
from erf_lab.data import digits_ms
from erf_lab.data.bins import COCO_SIZE_EDGES, assign_size_bins, bin_of, quantile_edges
from erf_lab.errors import ErfLabError

SMALL = "digits-ms:size=32,renders=1"


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """A data cache shared by the session (tests/erf_lab/test_train.py uses the same small set)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ERF_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "erf-lab-cache"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def small_arrays():
    return digits_ms.load_arrays(size=32, seed=0, renders=1)


def _digest(arrays):
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


# ---- digits-ms ---------------------------------------------------------------------------------
def test_generation_is_deterministic_and_seeded(small_arrays):
    val = {k: v for k, v in small_arrays.items() if k.startswith("val_")}
    again = digits_ms.generate(size=32, seed=0, renders=1, progress=False, splits=("val",))
    assert _digest(again) == _digest(val)  # same bytes, in a fresh generation of one split
    other = digits_ms.generate(size=32, seed=1, renders=1, progress=False, splits=("val",))
    assert not np.array_equal(other["val_images"], val["val_images"])


def test_cached_dataset_matches_fresh_generation(small_arrays):
    first = open_data(SMALL, split="val")  # generates into the cache
    second = open_data(SMALL, split="val")  # reads it back
    for ds in (first, second):
        raw = small_arrays["val_images"][ds[5]["index"]].astype(np.float32) / 255.0
        expect = (torch.from_numpy(raw).permute(2, 0, 1) - ds._mean_t) / ds._std_t
        assert torch.allclose(ds[5]["image"], expect, atol=1e-6)
        assert ds[5]["label"] == small_arrays["val_labels"][5]


def test_splits_are_disjoint_by_source_digit_and_stratified(small_arrays):
    from sklearn.datasets import load_digits

    glyph_sets = {s: set(small_arrays[f"{s}_glyphs"].tolist()) for s in ("train", "val", "test")}
    assert not glyph_sets["train"] & glyph_sets["val"]
    assert not glyph_sets["train"] & glyph_sets["test"]
    assert not glyph_sets["val"] & glyph_sets["test"]
    assert set.union(*glyph_sets.values()) == set(range(1797))
    # labels are those of the source digits, and every class is in every split in proportion
    target = load_digits().target
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(small_arrays[f"{s}_labels"], target[small_arrays[f"{s}_glyphs"]])
        counts = np.bincount(small_arrays[f"{s}_labels"], minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    # pixel-level: no glyph image of the test split equals one of the train split
    imgs = load_digits().images
    train_glyphs = {imgs[g].tobytes() for g in glyph_sets["train"]}
    dup = sum(imgs[g].tobytes() in train_glyphs for g in glyph_sets["test"])
    assert dup == 0


@pytest.fixture(scope="module")
def pyramids():
    return digits_ms.PhotoPyramids(digits_ms._photos())


@pytest.mark.parametrize("size", [64, 32, 16])
def test_render_box_is_exactly_the_pasted_ink(pyramids, size):
    from sklearn.datasets import load_digits

    glyphs = load_digits().images
    rng = np.random.default_rng(123)
    for k in range(40):
        s = digits_ms.render_sample(rng, glyphs[k * 37], pyramids, size, jitter=True)
        changed = (s["image"] != s["background"]).any(-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        x, y, w, h = s["box"]
        assert (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1) == (x, y, w, h)
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        # the ink is the digit, not a sliver of it (the smallest objects are 0.12 x size)
        ink_rows = np.flatnonzero(glyphs[k * 37].max(1) >= 1)
        assert h >= len(ink_rows) * 0.5 or h >= min(3, 0.12 * size)
    # a list of photographs works too (converted per call), with the same result
    draws = np.random.default_rng(5).random(len(digits_ms.DRAWS))
    a = digits_ms.render_sample(draws, glyphs[0], pyramids, size, jitter=True)
    b = digits_ms.render_sample(draws, glyphs[0], digits_ms._photos(), size, jitter=True)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["box"], b["box"])
    none = digits_ms.render_batch(np.zeros((0, len(digits_ms.DRAWS))), np.zeros((0, 8, 8)), pyramids, size, True)
    assert none["image"].shape == (0, 3, size, size) and none["box"].shape == (0, 4)


def test_render_glyph_is_pil_bilinear():
    """The glyph resize matrix against PIL's own (antialiased) bilinear resize of the 8x8 digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    glyphs = load_digits().images
    for k, scale in [(0, 0.4), (1, 0.7), (2, 1.0), (3, 1.3), (4, 2.6), (5, 4.1), (6, 6.7), (7, 0.55)]:
        side = max(1, int(round(8 * scale)))
        ref = Image.fromarray((glyphs[k] / 16.0).astype(np.float32), mode="F").resize((side, side), Image.BILINEAR)
        ref = np.asarray(ref, np.float32).copy()
        ref[ref < digits_ms.ALPHA_CUT] = 0.0
        rows, cols = np.flatnonzero(ref.any(1)), np.flatnonzero(ref.any(0))
        ref = ref[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        got = digits_ms.render_glyph(glyphs[k], scale)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_photo_pyramid_crops_are_area_averages(pyramids):
    photos = digits_ms._photos()
    p = photos[1].astype(np.float64) / 255.0
    # a crop of the output's side at whole-pixel offsets is the photo's pixels (mirrored or not)
    got = pyramids.crops(np.array([1, 1]), np.array([37, 37]), np.array([101, 101]), np.array([32, 32]), 32,
                         np.array([False, True])).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got[0], p[37:69, 101:133], atol=1e-4)
    np.testing.assert_allclose(got[1], p[37:69, 101:133][:, ::-1], atol=1e-4)
    # 2x and 4x (aligned): each output pixel is the mean of its 2x2 / 4x4 block of photo pixels
    for f in (2, 4):
        y0, x0 = 8 * f, 20 * f
        got = pyramids.crops(np.array([1]), np.array([y0]), np.array([x0]), np.array([32 * f]), 32,
                             np.array([False]))[0].numpy().transpose(1, 2, 0)
        block = p[y0:y0 + 32 * f, x0:x0 + 32 * f].reshape(32, f, 32, f, 3).mean((1, 3))
        np.testing.assert_allclose(got, block, atol=1e-4)
    # any ratio: close to torch's antialiased resize, unlike a plain bilinear resize (aliased)
    for side, y0, x0 in [(427, 0, 100), (301, 50, 203), (150, 211, 17), (97, 3, 500)]:
        got = pyramids.crops(np.array([0]), np.array([y0]), np.array([x0]), np.array([side]), 64,
                             np.array([False]))[0]
        crop = torch.from_numpy(photos[0][y0:y0 + side, x0:x0 + side].astype(np.float32) / 255).permute(2, 0, 1)[None]
        ref = torch.nn.functional.interpolate(crop, size=(64, 64), mode="bilinear", antialias=True)[0]
        plain = torch.nn.functional.interpolate(crop, size=(64, 64), mode="bilinear", antialias=False)[0]
        err, aliased = (got - ref).abs().mean(), (plain - ref).abs().mean()
        assert err < 0.02 and (side < 128 or err < 0.6 * aliased), (side, float(err), float(aliased))


def test_philox_known_answers_and_fresh_draws():
    # Random123's kat_vectors for philox4x32-10: counter, key -> output
    for ctr, key, out in [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]:
        assert digits_ms.philox4x32(np.array(ctr, np.uint32), key).tolist() == list(out)
    d = digits_ms.fresh_draws(0, 1, np.arange(20000))
    assert d.shape == (20000, len(digits_ms.DRAWS)) and 0 < d.min() and d.max() < 1
    assert abs(d.mean() - 0.5) < 0.003 and abs(d.var() * 12 - 1) < 0.01
    assert np.abs(np.corrcoef(d.T) - np.eye(d.shape[1])).max() < 0.04
    # a function of (seed, epoch, item) alone: any batch gives the same row; each key changes it
    np.testing.assert_array_equal(digits_ms.fresh_draws(0, 1, [1234, 5])[0], d[1234])
    for other in (digits_ms.fresh_draws(1, 1, [1234]), digits_ms.fresh_draws(0, 2, [1234]), d[1235:1236]):
        assert not np.isclose(other[0], d[1234]).any()


def test_size_floor_narrows_fresh_renders_only():
    """set_size_floor(f): fresh boxes are at least about f x side (the ink box of a glyph
    scaled to s is within a pixel or two of s), the full range reaches well below; cached
    train items, val and test do not change."""
    train = open_data("digits-ms:size=64,renders=1", split="train", num_images=300)
    cached = train[0]["image"]
    train.set_epoch(1)
    full = np.array([float((it["box"][2] * it["box"][3]).sqrt()) for it in train.__getitems__(list(range(300)))])
    train.set_size_floor(0.45)
    big = np.array([float((it["box"][2] * it["box"][3]).sqrt()) for it in train.__getitems__(list(range(300)))])
    assert big.min() >= 0.45 * 64 - 3 > full.min() + 10
    assert big.max() <= 0.84 * 64 + 2
    train.set_epoch(0)
    assert torch.equal(train[0]["image"], cached)  # epoch 0: the cached renders
    with pytest.raises(ErfLabError, match="size floor"):
        train.set_size_floor(0.05)


def test_fresh_train_renders_per_epoch():
    train = open_data(SMALL, split="train")
    cached = [train[i] for i in range(4)]
    train.set_epoch(1)
    one = [train[i] for i in range(4)]
    train.set_epoch(2)
    two = [train[i] for i in range(4)]
    train.set_epoch(1)
    again = [train[i] for i in range(4)]
    for c, a, b, r in zip(cached, one, two, again):
        assert c["label"] == a["label"] == b["label"] and c["index"] == a["index"]  # same glyph and label
        assert not torch.equal(c["image"], a["image"]) and not torch.equal(a["image"], b["image"])
        assert torch.equal(a["image"], r["image"]) and torch.equal(a["box"], r["box"])  # seeded by epoch
        x, y, w, h = a["box"].tolist()
        assert x >= 0 and y >= 0 and x + w <= 32 and y + h <= 32
        size = np.sqrt(w * h)
        assert a["size_bin"] == bin_of(np.array([size]), train.size_bin_edges)[0]  # the fresh box's bin
    # the glyph is the one of the item: the fresh render equals render_sample of that glyph
    from sklearn.datasets import load_digits

    j = one[0]["index"]
    draws = digits_ms.fresh_draws(0, 1, [j])[0]
    s = digits_ms.render_sample(draws, load_digits().images[train.glyphs[0]], digits_ms._photos(), 32, jitter=True)
    expect = (torch.from_numpy(s["image"].astype(np.float32) / 255.0).permute(2, 0, 1) - train._mean_t) / train._std_t
    assert torch.allclose(one[0]["image"], expect, atol=1e-6)
    # val and test never change; fresh=0 keeps the cached train renders
    val = open_data(SMALL, split="val")
    v0 = val[0]["image"]
    val.set_epoch(3)
    assert torch.equal(val[0]["image"], v0)
    fixed = open_data(SMALL + ",fresh=0", split="train")
    fixed.set_epoch(5)
    assert torch.equal(fixed[0]["image"], cached[0]["image"])


def _same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["index"] == y["index"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["box"], y["box"])
        assert (x["label"], x["size_bin"]) == (y["label"], y["size_bin"])


@pytest.mark.parametrize("kwargs", [{}, {"image_size": 48, "channels": 1}])
def test_batched_items_equal_single_items_in_any_batch(kwargs):
    ds = open_data(SMALL, split="all", **kwargs)  # fresh train items beside cached val and test ones
    ds.set_epoch(2)
    idx = np.random.default_rng(0).choice(len(ds), 45, replace=False).tolist()
    assert 10 < sum(i < len(open_data(SMALL, split="train")) for i in idx) < 40
    single = [ds[i] for i in idx]
    _same_items(ds.__getitems__(idx), single)
    _same_items(ds.__getitems__(idx[::-1])[::-1], single)
    _same_items(sum((ds.__getitems__(idx[k:k + 7]) for k in range(0, len(idx), 7)), []), single)
    assert ds[-1]["index"] == ds[len(ds) - 1]["index"] and ds.__getitems__([]) == []
    with pytest.raises(IndexError):
        ds.__getitems__([0, len(ds)])


def test_dataloader_batches_are_the_single_items():
    """Through the real access path (DataLoader over a Subset, which calls __getitems__), any
    batch size, order and number of workers gives each item's own render."""
    from torch.utils.data import Subset

    train = open_data(SMALL, split="train")
    train.set_epoch(3)
    idx = np.random.default_rng(1).choice(len(train), 40, replace=False).tolist()
    single = {i: train[i] for i in idx}
    for batch_size, workers in [(16, 0), (5, 0), (7, 1)]:
        loader = DataLoader(Subset(train, idx), batch_size=batch_size, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(batch_size))
        seen = 0
        for batch in loader:
            for k, j in enumerate(batch["index"].tolist()):
                ref = single[j]
                assert torch.equal(batch["image"][k], ref["image"]) and torch.equal(batch["box"][k], ref["box"])
                assert (batch["label"][k], batch["size_bin"][k]) == (ref["label"], ref["size_bin"])
                seen += 1
        assert seen == len(idx)


def test_fresh_renders_have_the_cached_distribution():
    """Fresh and cached renders come from one renderer: the fresh train set fills the cached
    set's size bins evenly and matches its pixel statistics (normalised with them)."""
    train = open_data(SMALL, split="train")
    train.set_epoch(1)
    items = train.__getitems__(list(range(len(train))))
    counts = np.bincount([it["size_bin"] for it in items], minlength=10)
    assert counts.min() >= 0.6 * len(train) / 10 and counts.max() <= 1.4 * len(train) / 10
    x = torch.stack([it["image"] for it in items])
    np.testing.assert_allclose(x.mean((0, 2, 3)).numpy(), 0.0, atol=0.08)
    np.testing.assert_allclose(x.std((0, 2, 3)).numpy(), 1.0, atol=0.08)


def test_boxes_inside_images_and_scaled_with_image_size(small_arrays):
    ds = open_data(SMALL, split="test")
    boxes = small_arrays["test_boxes"]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= 1).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 32).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()
    big = open_data(SMALL, split="test", image_size=64, num_images=5, seed=3)
    for item in big:
        assert item["image"].shape == (3, 64, 64)
        np.testing.assert_allclose(item["box"].numpy(), 2 * ds[item["index"]]["box"].numpy())


def test_size_independent_of_class_and_spread_7x(small_arrays):
    b = small_arrays["train_boxes"].astype(np.float64)
    size = np.sqrt(b[:, 2] * b[:, 3])
    assert np.percentile(size, 99) / np.percentile(size, 1) > 4.0
    # size drawn independently of the class: the class explains ~nothing of log size (eta^2;
    # about 9/N by chance; a size tied to the class, e.g. by the glyph's width, gives > 0.1)
    labels, logs = small_arrays["train_labels"], np.log(size)
    between = sum((labels == c).sum() * (logs[labels == c].mean() - logs.mean()) ** 2 for c in range(10))
    assert between / ((logs - logs.mean()) ** 2).sum() < 0.03


def test_normalisation_is_the_train_statistics():
    ds = open_data(SMALL, split="train")
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    np.testing.assert_allclose(x.mean((0, 2, 3)).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std((0, 2, 3)).numpy(), 1.0, atol=1e-3)
    grey = open_data(SMALL, split="train", channels=1, num_images=8)
    assert grey[0]["image"].shape == (1, 32, 32) and len(grey.mean) == 1


def test_size_bins_balanced_on_train_and_shared_by_splits():
    train = open_data(SMALL, split="train")
    test = open_data(SMALL, split="test")
    assert len(train.size_bin_edges) == 11 and train.size_bin_edges == test.size_bin_edges
    counts = np.bincount(train.size_bins, minlength=10)
    assert counts.min() >= 0.5 * len(train) / 10 and counts.max() <= 1.6 * len(train) / 10
    np.testing.assert_array_equal(train.size_bins, bin_of(train.sizes, train.size_bin_edges))
    # the item dicts agree with the arrays and batch with the default collate
    batch = next(iter(DataLoader(test, batch_size=16)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["box"].shape == (16, 4)
    np.testing.assert_array_equal(batch["size_bin"].numpy(), test.size_bins[:16])
    np.testing.assert_array_equal(batch["label"].numpy(), test.labels[:16])
    coco = open_data(SMALL, split="test", size_bins="coco")
    assert coco.size_bin_edges == COCO_SIZE_EDGES and set(coco.size_bins.tolist()) <= {0, 1, 2}


def test_quantile_edges_equal_counts_and_ties():
    rng = np.random.default_rng(0)
    sizes = rng.lognormal(size=1000)
    edges, bins = assign_size_bins(sizes, "quantile10")
    assert (np.bincount(bins) == 100).all()
    assert edges[0] == sizes.min() and edges[-1] == sizes.max()
    # ties never straddle an edge
    tied = np.repeat(np.arange(20.0), 50)
    _, tb = assign_size_bins(tied, "quantile4")
    for v in range(20):
        assert len(set(tb[tied == v])) == 1
    assert (np.bincount(tb) == 250).all()
    assert bin_of(np.array([10.0, 32.0, 95.9, 500.0, np.nan]), COCO_SIZE_EDGES).tolist() == [0, 1, 1, 2, -1]
    for bad in ("quantile0", "deciles", [3.0, 1.0]):
        with pytest.raises(ErfLabError):
            assign_size_bins(sizes, bad)


def test_num_images_subset_is_seeded_and_indexes_the_full_split():
    full = open_data(SMALL, split="test")
    a = open_data(SMALL, split="test", num_images=20, seed=1)
    b = open_data(SMALL, split="test", num_images=20, seed=1)
    c = open_data(SMALL, split="test", num_images=20, seed=2)
    assert len(a) == 20 and [x["index"] for x in a] == [x["index"] for x in b]
    assert [x["index"] for x in a] != [x["index"] for x in c]
    for item in list(a)[:5]:
        ref = full[item["index"]]
        assert torch.equal(item["image"], ref["image"]) and item["label"] == ref["label"]
        assert item["size_bin"] == ref["size_bin"]  # bins come from the full split, not the subset
    every = open_data(SMALL, split="all")
    assert len(every) == sum(len(open_data(SMALL, split=s)) for s in ("train", "val", "test"))


# ---- noise and the grammar -----------------------------------------------------------------------
def test_noise():
    ds = open_data("noise", image_size=(16, 24), channels=1, num_images=7, seed=4)
    assert len(ds) == 7 and ds.class_names == [] and ds.size_bin_edges is None
    item = ds[3]
    assert item["image"].shape == (1, 16, 24) and item["label"] == -1 and item["size_bin"] == -1
    assert item["box"].tolist() == [0.0, 0.0, 24.0, 16.0]
    assert torch.equal(item["image"], open_data("noise", image_size=(16, 24), channels=1, num_images=50, seed=4)[3]["image"])
    assert not torch.equal(item["image"], open_data("noise", image_size=(16, 24), channels=1, seed=5)[3]["image"])
    x = torch.stack([open_data("noise", image_size=64)[i]["image"] for i in range(50)])
    assert len(open_data("noise")) == 50 and abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


@pytest.mark.parametrize("spec, kwargs, fragment", [
    ("", {}, "empty"),
    ("noise:5", {}, "no options"),
    ("digits-ms:colour=2", {}, "unknown option"),
    ("digits-ms:size=abc", {}, "not an integer"),
    ("digits-ms:size=8", {}, ">= 16"),
    ("noise", {"split": "training"}, "split"),
    ("noise", {"channels": 4}, "channels"),
    ("noise", {"num_images": 0}, "num_images"),
    ("noise", {"image_size": (0, 3)}, "image_size"),
    ("/no/such/folder", {}, "no such folder"),
    ("coco:only.json", {}, "expected coco:"),
])
def test_bad_specs_give_one_line(spec, kwargs, fragment):
    with pytest.raises(ErfLabError) as info:
        open_data(spec, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(ErfLabError, match="is a file"):
        open_data(str(f))
