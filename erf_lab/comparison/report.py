"""The comparison's self-contained HTML page (``index.html``): what was compared, the metric
table, the two figures, the failures and the metadata (:mod:`erf_lab.html`)."""
import html
from typing import TYPE_CHECKING, Any, Dict

from ..html import img_tag, page, table
from ..io import dumps

if TYPE_CHECKING:  # pragma: no cover
    from .result import ComparisonResult

__all__ = ["render_html", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("model", "epoch", "column", "layer", "image_h", "image_w", "depth", "n_images", "trf_y", "luo_size",
                 "sigma", "radius_mass@0.5", "radius_mass@0.9", "area_ratio_replknet@0.2", "erf_trf_ratio")


def render_html(result: "ComparisonResult", df: Any, pngs: Dict[str, bytes], title: str = "erf-lab ERF comparison") -> str:
    """The page for ``result``, its :meth:`~ComparisonResult.table` ``df`` and the PNG bytes of
    ``compare.png`` and ``growth.png``."""
    meta = result.meta
    overview = {
        "models": ", ".join(m["name"] for m in result.models),
        "columns": ", ".join(c["label"] for c in result.columns),
        "data": f"{meta.get('data', '?')}, {meta.get('num_images', '?')} images, seed {meta.get('seed', '?')}"
                + (f" ({meta['data_note']})" if meta.get("data_note") else ""),
        "protocol": f"{meta.get('preset', '?')}: {meta.get('options', {})}",
        "growth axis": meta.get("axis", "depth"),
        "device": meta.get("device", "?"),
    }
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    rows = df[cols].astype(object).where(df[cols].notna(), None).values.tolist()
    parts = [
        '<p class="muted">Effective receptive fields of every model, layer and image size on the same seeded '
        "images (Luo et al. 2016; RepLKNet's protocol by default), with the theoretical RF of each unit.</p>",
        "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in overview.items())
        + "</dl>",
    ]
    if result.failures:
        parts.append("<h2>Failed</h2><ul>" + "".join(
            f'<li class="bad">{html.escape(f["model"])} at {f["image_size"][0]}x{f["image_size"][1]}: '
            f"{html.escape(f['error'])}</li>" for f in result.failures) + "</ul>")
    parts += ["<h2>ERF size metrics</h2>", table(cols, rows, left=4),
              '<p class="muted">Luo size: side of the square holding the map\'s mass (Luo et al.); sigma: geometric '
              "mean of the second moments about the RF centre; radius of 50/90% mass: about the RF centre; area "
              "ratio: RepLKNet's share of the image above threshold t; erf_trf_ratio: Luo size over the "
              "theoretical RF side. compare.csv holds every metric.</p>"]
    for name, caption in (("compare.png", "Maps"), ("growth.png", "Growth")):
        if name in pngs:
            parts += [f"<h2>{caption}</h2>", img_tag(pngs[name], name)]
    parts += ["<h2>Metadata</h2>", f"<pre>{html.escape(dumps(result.to_json()))}</pre>"]
    return page(title, parts)
