"""Self-contained HTML reports: figures as PNG bytes, the page style, tables and embedded images.

A page built from these has no scripts, styles or fonts from elsewhere (every PNG is a ``data:``
URI): one file that can be mailed or archived. Used by the t-SNE report and ``erf-lab compare``.
"""
import base64
import html
import io
from typing import TYPE_CHECKING, Any, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["figure_png", "CSS", "fmt", "table", "png_size", "img_tag", "page"]

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: .4em 0 1.2em; }
pre { background: #f7f7f7; padding: 1em; overflow: auto; font-size: 12px; max-height: 40em; }
.muted { color: #666; } dl { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; }
dt { font-weight: 600; } dd { margin: 0; } .bad { color: #a00; }
"""


def figure_png(fig: "Figure", dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, None and non-finite numbers as a dash, text escaped."""
    if v is None:
        return "&ndash;"
    if isinstance(v, (float, np.floating)):
        return "&ndash;" if not np.isfinite(v) else f"{v:.{digits}f}"
    return html.escape(str(v))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (labels), the rest right-aligned."""
    th = "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else f"<th>{html.escape(h)}</th>"
                 for i, h in enumerate(header))
    body = []
    for r in rows:
        cells = "".join(f'<td class="l">{fmt(v)}</td>' if i < left else f"<td>{fmt(v)}</td>" for i, v in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_size(png: bytes) -> Tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a data URI, with its pixel size."""
    w, h = png_size(png)
    src = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{src}" width="{w}" height="{h}" alt="{html.escape(alt)}">'


def page(title: str, body: Sequence[str]) -> str:
    """A complete page: ``body`` parts under a title heading, with :data:`CSS` inline."""
    head = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>"]
    return "\n".join(head + list(body) + ["</body></html>"]) + "\n"
