"""erf_lab.data readers for the formats users already have: COCO files and image folders."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from erf_lab.data import IMAGENET_MEAN, IMAGENET_STD, open_data
from erf_lab.errors import ErfLabError

# the tiny files here have fewer distinct object sizes than the default 10 bins
pytestmark = pytest.mark.filterwarnings("ignore:erf-lab. only .* distinct object sizes")

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _unnormalise(ds, image):
    return image * ds._std_t + ds._mean_t


def _photo(path, w, h, rect=None, colour=RED, bg=BLUE):
    """A ``w`` x ``h`` image of colour ``bg`` with a filled ``rect`` = (x, y, rw, rh) of ``colour``."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    if rect is not None:
        x, y, rw, rh = rect
        a[y:y + rh, x:x + rw] = colour
    Image.fromarray(a).save(path)


@pytest.fixture
def coco(tmp_path):
    """A small COCO file: non-contiguous category ids (90, 3, 11), one crowd object, one tiny object."""
    images = tmp_path / "images"
    images.mkdir()
    _photo(images / "a.png", 120, 80, rect=(40, 20, 30, 40))
    _photo(images / "b.png", 64, 64, rect=(0, 0, 16, 16))
    ann = {
        "info": {"description": "test"},
        "images": [{"id": 10, "file_name": "a.png", "width": 120, "height": 80},
                   {"id": 42, "file_name": "b.png", "width": 64, "height": 64}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 11, "name": "hydrant"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 90, "bbox": [40, 20, 30, 40], "area": 5.0, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 3, "bbox": [0, 0, 16, 16], "area": 99.0, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 11, "bbox": [0, 0, 120, 80], "area": 1.0, "iscrowd": 1},
            {"id": 4, "image_id": 42, "category_id": 11, "bbox": [50, 50, 2, 3], "area": 6.0, "iscrowd": 0},
            {"id": 5, "image_id": 10, "category_id": 11, "bbox": [100.4, 60, 20, 20.5], "iscrowd": 0},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return path, images, ann


def _spec(path, images, options=""):
    return f"coco:{path}:{images}" + (f":{options}" if options else "")


# ---- COCO -----------------------------------------------------------------------------------------
def test_coco_categories_map_to_contiguous_labels_with_names(coco):
    path, images, _ = coco
    ds = open_data(_spec(path, images), image_size=32)
    assert ds.class_names == ["car", "hydrant", "toothbrush"] and ds.category_ids == [3, 11, 90]
    # crowd (id 3) and the 2x3 object (id 4, under min_size 4) are skipped; file order kept
    assert ds.annotation_ids == [1, 2, 5]
    assert ds.labels.tolist() == [2, 0, 1]
    assert [ds[i]["label"] for i in range(3)] == [2, 0, 1]
    assert not ds.has_splits and len(open_data(_spec(path, images), split="train")) == 3
    with_crowd = open_data(_spec(path, images, "crowd=1,min_size=0"), image_size=32)
    assert with_crowd.annotation_ids == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(ds.sizes, [np.sqrt(30 * 40), 16.0, np.sqrt(19.6 * 20.0)], rtol=1e-6)  # bbox, not area


def test_coco_full_mode_box_matches_the_object_pixels(coco):
    path, images, _ = coco
    ds = open_data(_spec(path, images, "mode=full"), image_size=(40, 60))
    item = ds[0]  # object (40, 20, 30, 40) in a 120 x 80 image, resized by 0.5
    assert item["box"].tolist() == [20.0, 10.0, 15.0, 20.0]
    rgb = _unnormalise(ds, item["image"])
    x, y, w, h = (int(v) for v in item["box"])
    inside = rgb[:, y + 1:y + h - 1, x + 1:x + w - 1]
    assert torch.allclose(inside, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand_as(inside), atol=1e-5)
    red = (rgb[0] > 0.5) & (rgb[2] < 0.5)
    assert not red[:y - 1].any() and not red[y + h + 1:].any() and not red[:, :x - 1].any()
    assert item["size_bin"] == int(ds.size_bins[0])


def test_coco_crop_mode_centres_the_object_with_context(coco):
    path, images, _ = coco
    ds = open_data(_spec(path, images, "margin=0.5"), image_size=64)
    item = ds[0]  # 30 x 40 object: square crop of side 80 centred on it, scaled by 64/80
    np.testing.assert_allclose(item["box"].numpy(), [20.0, 16.0, 24.0, 32.0], atol=1e-5)
    rgb = _unnormalise(ds, item["image"])
    assert torch.allclose(rgb[:, 20:44, 24:40], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 24, 16), atol=1e-5)
    assert rgb[2, 2, 2] > 0.99  # context around the object is the blue background
    corner = open_data(_spec(path, images, "margin=0.5"), image_size=64)[1]  # object at the image corner
    rgb = _unnormalise(ds, corner["image"])
    assert float(rgb[:, :8, :8].abs().max()) < 1e-6  # outside the photo: black
    assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD


def test_coco_size_bins(coco):
    path, images, _ = coco
    ds = open_data(_spec(path, images), size_bins="coco")
    assert ds.size_bins.tolist() == [1, 0, 0]
    q = open_data(_spec(path, images), size_bins="quantile3")
    assert sorted(q.size_bins.tolist()) == [0, 1, 2]


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("mutate, fragment", [
    (lambda a: "{not json", "invalid JSON at line 1"),
    (lambda a: [], "expected a JSON object"),
    (lambda a: {k: v for k, v in a.items() if k != "annotations"}, "'annotations'"),
    (lambda a: {**a, "annotations": [{"id": 1, "image_id": 10, "category_id": 3}]}, "lacks 'bbox'"),
    (lambda a: {**a, "images": [{"id": 10, "file_name": "a.png"}]}, "lacks 'width', 'height'"),
    (lambda a: {**a, "annotations": [{**a["annotations"][0], "bbox": [100, 20, 30, 40]}]}, "outside its image"),
    (lambda a: {**a, "annotations": [{**a["annotations"][0], "bbox": [1, 2, 3]}]}, "4 numbers"),
    (lambda a: {**a, "annotations": [{**a["annotations"][0], "bbox": [1, 2, 0, 4]}]}, "non-positive"),
    (lambda a: {**a, "annotations": [{**a["annotations"][0], "category_id": 7}]}, "category_id 7"),
    (lambda a: {**a, "annotations": [{**a["annotations"][0], "image_id": 99}]}, "image_id 99"),
    (lambda a: {**a, "annotations": [a["annotations"][3]]}, "no usable objects"),
])
def test_coco_malformed_files_give_one_line(coco, tmp_path, mutate, fragment):
    path, images, ann = coco
    bad = _write(tmp_path / "bad.json", mutate(ann))
    with pytest.raises(ErfLabError) as info:
        open_data(_spec(bad, images))
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg and ("bad.json" in msg)


def test_coco_missing_and_undecodable_images(coco, tmp_path):
    path, images, ann = coco
    with pytest.raises(ErfLabError, match="images folder not found"):
        open_data(_spec(path, tmp_path / "nope"))
    ann = dict(ann, images=ann["images"] + [{"id": 7, "file_name": "gone.png", "width": 10, "height": 10}],
               annotations=ann["annotations"] + [{"id": 9, "image_id": 7, "category_id": 3, "bbox": [0, 0, 9, 9]}])
    missing = _write(tmp_path / "missing.json", ann)
    with pytest.raises(ErfLabError, match=r"gone\.png: image file not found .*--skip-bad"):
        open_data(_spec(missing, images))
    with pytest.warns(UserWarning, match="skipped the objects of 1 missing"):
        assert open_data(_spec(missing, images), skip_bad=True).annotation_ids == [1, 2, 5]
    (images / "gone.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ErfLabError, match="cannot decode"):
        open_data(_spec(missing, images))
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        assert len(open_data(_spec(missing, images), skip_bad=True)) == 3


def test_cli_reports_bad_data_as_one_line_and_exit_2(coco, tmp_path, capsys):
    path, images, _ = coco
    bad = _write(tmp_path / "bad.json", "{oops")
    rc = cli.main(["train", "--data", _spec(bad, images), "--epochs", "1", "--out", str(tmp_path / "c.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "bad.json: invalid JSON" in err


# ---- image folders --------------------------------------------------------------------------------
def test_class_folders(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            _photo(tmp_path / cls / f"{i}.png", 30, 20, colour=RED, rect=(0, 0, 30, 20))
    Image.fromarray(np.full((10, 10), 128, np.uint8)).save(tmp_path / "zebra" / "sub" / "grey.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_data(str(tmp_path), image_size=(12, 16))
    assert ds.class_names == ["ant", "zebra"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.paths[-1].endswith("grey.jpg")  # searched recursively, converted to RGB
    item = ds[0]
    assert item["image"].shape == (3, 12, 16) and item["box"].tolist() == [0, 0, 16, 12] and item["size_bin"] == -1
    assert torch.allclose(_unnormalise(ds, item["image"])[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert not ds.has_splits and ds.size_bin_edges is None
    grey = open_data(str(tmp_path), channels=1, image_size=8)
    assert grey[5]["image"].shape == (1, 8, 8) and abs(float(_unnormalise(grey, grey[5]["image"]).mean()) - 128 / 255) < 1e-3


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        _photo(tmp_path / f"img{i}.jpg", 50, 40)
    ds = open_data(str(tmp_path), num_images=3, seed=1)
    assert len(ds) == 3 and ds.class_names == [] and set(ds.labels.tolist()) == {-1}
    assert ds[0]["image"].shape == (3, 224, 224) and ds[0]["label"] == -1


def test_split_folders(tmp_path):
    for split, classes in (("train", ("cat", "dog")), ("val", ("dog",)), ("test", ("bird", "cat"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            _photo(tmp_path / split / c / "x.png", 8, 8)
    train, val, test = (open_data(str(tmp_path), split=s, image_size=8) for s in ("train", "val", "test"))
    assert train.class_names == val.class_names == test.class_names == ["bird", "cat", "dog"]
    assert train.labels.tolist() == [1, 2] and val.labels.tolist() == [2] and test.labels.tolist() == [0, 1]
    assert train.has_splits and len(open_data(str(tmp_path), split="all")) == 5
    (tmp_path / "test").rename(tmp_path / "other")
    with pytest.raises(ErfLabError, match="no 'test' sub-folder"):
        open_data(str(tmp_path), split="test")


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ErfLabError, match="no images found"):
        open_data(str(tmp_path / "empty"))
    good = tmp_path / "good" / "a"
    good.mkdir(parents=True)
    for i in range(3):
        _photo(good / f"{i}.png", 9, 9)
    (good / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ErfLabError) as info:
        open_data(str(tmp_path / "good"))
    assert "broken.png: cannot decode" in str(info.value) and "--skip-bad" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        assert len(open_data(str(tmp_path / "good"), skip_bad=True)) == 3
    _photo(tmp_path / "good" / "loose.png", 9, 9)
    (good / "broken.png").unlink()
    with pytest.warns(UserWarning, match="ignoring 1 image"):
        assert len(open_data(str(tmp_path / "good"))) == 3
    # truncated: caught when the folder is opened
    _photo(good / "cut.png", 64, 64)
    data = (good / "cut.png").read_bytes()
    (good / "cut.png").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ErfLabError, match="cut.png: cannot decode"):
            open_data(str(tmp_path / "good"))
        ds = open_data(str(tmp_path / "good"), skip_bad=True)
    assert len(ds) == 3
    # a file that disappears after opening: one line when the item is read
    os.unlink(ds.paths[0])
    with pytest.raises(ErfLabError, match="0.png: image file not found"):
        ds[0]
