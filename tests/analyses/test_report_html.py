"""End to end: `erf-lab tsne` / `run_tsne` on digits-ms, the report files, `erf-lab report`, and the
HTML in headless Chromium."""
import base64
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cli
from analyses.scores import SCORE_COLUMNS
from analyses.results import EMBEDDING_COLUMNS, TSNEResult
from analyses.tsne import run_tsne

SMALL = dict(max_samples=100, perplexity=10, n_iter=250, n_jobs=1, progress=False)
STUDY_KW = {"op": "conv", "num_classes": 10, "widths": [8, 16], "depth": 1, "expand": 1, "stem_width": 8}
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "wbr", "area", "base", "embed", "track"}


class _Page(html.parser.HTMLParser):
    """Collects images and tables and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.tables, self.errors = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag not in VOID:
            self.stack.append(tag)
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _study_checkpoint(path: Path, seed: int) -> Path:
    from dk_ops import models

    torch.manual_seed(seed)
    net = models.create("study_net", **STUDY_KW)
    torch.save({"arch": "study_net", "arch_kwargs": STUDY_KW, "state_dict": net.state_dict(), "data_spec": "digits-ms",
                "class_names": [str(i) for i in range(10)], "input_size": [3, 64, 64]}, path)
    return path


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tsne")
    a = _study_checkpoint(d / "conv_a.pt", 0)
    b = _study_checkpoint(d / "conv_b.pt", 1)
    out = d / "report"
    rc = cli.main(["tsne", "--model", str(a), "--model", str(b), "--pooling", "box", "--max-samples", "200",
                   "--perplexity", "10", "--iterations", "250", "--jobs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_report_files_are_complete_and_valid(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"index.html", "scores.csv", "report.json", "embedding_conv_a.csv", "embedding_conv_b.csv",
            "tsne_conv_a.png", "tsne_conv_b.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes left nothing behind

    scores = pd.read_csv(report_dir / "scores.csv")
    assert list(scores.columns) == SCORE_COLUMNS
    assert set(scores.model) == {"conv_a", "conv_b"} and set(scores.space) == {"features", "embedding"}
    assert set(scores.labels) == {"class", "size", "size|class"}
    assert scores.knn_acc.between(0, 1).all() and scores.chance.between(0, 1).all()  # size|class too: 20 per class
    assert (scores[scores.labels != "size|class"].n == 200).all()

    emb = pd.read_csv(report_dir / "embedding_conv_a.csv")
    assert list(emb.columns) == EMBEDDING_COLUMNS and len(emb) == 200
    assert np.isfinite(emb[["x", "y"]].to_numpy()).all() and emb.label.between(0, 9).all()
    assert (emb.class_name.astype(str) == emb.label.astype(str)).all()  # digits are named by their value
    same = pd.read_csv(report_dir / "embedding_conv_b.csv")
    assert (same["index"] == emb["index"]).all()  # every model sees the same samples

    meta = json.loads((report_dir / "report.json").read_text())
    assert meta["meta"]["seed"] == 0 and meta["meta"]["options"]["perplexity"] == 10
    assert {"torch", "numpy", "scikit-learn", "erf_lab"} <= set(meta["meta"]["versions"])
    m0 = meta["models"][0]
    assert m0["features"]["layer"] == "blocks" and m0["features"]["pooling"] == "box"
    assert m0["features"]["box_mapping"]["source"] == "theoretical receptive field"
    assert m0["embedding"]["perplexity"] == 10 and m0["model"]["arch"] == "study_net"

    for name in ("tsne_conv_a.png", "tsne_conv_b.png"):
        with Image.open(report_dir / name) as im:
            im.load()
            assert im.format == "PNG" and im.width > 600 and im.height > 300


def test_html_parses_and_embeds_every_figure(report_dir):
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.errors and page.stack == []
    assert page.tables >= 2 and len(page.imgs) == 2
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            im.load()
            assert (im.width, im.height) == (int(img["width"]), int(img["height"]))
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)  # self-contained
    assert "conv_a" in text and "trustworthiness" in text and "&quot;versions&quot;" in text


def test_report_command_rebuilds_html_from_saved_results(report_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    (copy / "index.html").unlink()
    (copy / "tsne_conv_a.png").unlink()
    assert cli.main(["report", str(copy), "--color", "size"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = _Page()
    page.feed((copy / "index.html").read_text(encoding="utf-8"))
    assert len(page.imgs) == 2 and (copy / "tsne_conv_a.png").is_file()
    loaded = TSNEResult.load(copy)
    assert loaded.color == ("size",) and [m.name for m in loaded.models] == ["conv_a", "conv_b"]
    original = TSNEResult.load(report_dir)
    np.testing.assert_allclose(loaded["conv_b"].coords, original["conv_b"].coords)
    pd.testing.assert_frame_equal(loaded.scores, original.scores)


def test_library_run_with_modules_and_gap_pooling(tmp_path):
    from dk_ops import models

    torch.manual_seed(0)
    net = models.create("study_net", **STUDY_KW)
    res = run_tsne([net], names=["net"], data="digits-ms", color="class", **SMALL)
    assert [m.name for m in res.models] == ["net"] and res.color == ("class",)
    assert res.models[0].meta["features"]["pooling"] == "gap"
    assert not list(tmp_path.iterdir())  # out=None writes nothing
    fig = res.plot()
    assert len(fig.axes) == 1


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_bad_layer_lists_close_matches(tmp_path, capsys):
    ckpt = _study_checkpoint(tmp_path / "m.pt", 0)
    rc = cli.main(["tsne", "--model", str(ckpt), "--layer", "block", "--max-samples", "100", "--perplexity", "10",
                   "--iterations", "250", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    line = _one_line(capsys.readouterr().err)
    assert "no layer named 'block'" in line and "did you mean blocks" in line
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_too_few_samples_for_perplexity_is_one_line(tmp_path, capsys):
    ckpt = _study_checkpoint(tmp_path / "m.pt", 0)
    rc = cli.main(["tsne", "--model", str(ckpt), "--max-samples", "50", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    line = _one_line(capsys.readouterr().err)
    assert "max_samples=50 (--max-samples) is too few for t-SNE with perplexity 30" in line and "at least 92" in line


def test_cli_bad_color_and_missing_report(tmp_path, capsys):
    ckpt = _study_checkpoint(tmp_path / "m.pt", 0)
    assert cli.main(["tsne", "--model", str(ckpt), "--color", "shape", "--no-progress"]) == 2
    assert "color (--color) takes one or more of class, size, got ['shape']" in _one_line(capsys.readouterr().err)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds no report.json" in _one_line(capsys.readouterr().err)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  var d = document.createElement('div');
  d.id = 'img-check'; d.setAttribute('data-total', imgs.length); d.setAttribute('data-ok', ok.length);
  d.setAttribute('data-width', document.documentElement.scrollWidth);
  document.body.appendChild(d);
});
</script>"""


def test_html_renders_in_headless_chromium_with_every_image_loaded(report_dir, tmp_path):
    assert CHROMIUM, "chromium is needed (.ci/run installs it: apt-get install chromium)"
    page = tmp_path / "page.html"
    page.write_text((report_dir / "index.html").read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"),
                    encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000", "--virtual-time-budget=10000",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    m = re.search(r'id="img-check" data-total="(\d+)" data-ok="(\d+)" data-width="(\d+)"', proc.stdout)
    assert m, f"no check element in the dumped DOM (rc={proc.returncode}): {proc.stderr[-500:]}"
    total, ok, width = (int(v) for v in m.groups())
    assert total == 2 and ok == total
    assert width <= 1280  # figures scale down: no horizontal scrolling
