"""``DIR/RESULTS.md`` and ``DIR/index.html``: every figure with its numbers, claims, and the exact command."""
import html
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ._io import FigureResult, rel
from erf_lab.io import PathLike, jsonable, versions, write_text

__all__ = ["write_report"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def markdown_table(df: Any, max_rows: int = 60) -> str:
    """A DataFrame as a GitHub markdown table (numbers to 4 significant digits)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n({len(df) - max_rows} more rows in the CSV)")
    return "\n".join(lines)


VERDICT_NOTE = ("Each effect is a difference of means (or a Spearman correlation) over every seed and the same test "
                "items; the 95% interval is a hierarchical bootstrap over seeds, then items (paired). A claim holds "
                "when the whole interval lies on its predicted side, is contradicted when it lies on the other "
                "side, and is inconclusive when it covers zero.")


def _verdict_markdown(effects: Sequence[Any]) -> List[str]:
    lines = ["## Verdicts", "", VERDICT_NOTE, "",
             "| # | claim | measure | effect | 95% CI | verdict | n |", "|---|---|---|---|---|---|---|"]
    for e in effects:
        lines.append(f"| {e.claim_id} | {e.claim} | {e.measure} | {e.effect:+.4f} | {e.ci()} | **{e.verdict}** | {e.n} |")
    return lines + [""]


def _verdict_html(effects: Sequence[Any]) -> str:
    colour = {"holds": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#9a6700"}
    rows = "".join(
        f"<tr><td>{html.escape(e.claim_id)}</td><td>{html.escape(e.claim)}</td><td>{html.escape(e.measure)}</td>"
        f"<td>{e.effect:+.4f}</td><td>{html.escape(e.ci())}</td>"
        f"<td class='verdict' style='color:{colour.get(e.verdict, '#000')}'><b>{html.escape(e.verdict)}</b></td>"
        f"<td>{html.escape(e.n)}</td></tr>" for e in effects)
    return ("<h2>Verdicts</h2><p>" + html.escape(VERDICT_NOTE) + "</p><table id='verdicts'><thead><tr><th>#</th>"
            "<th>claim</th><th>measure</th><th>effect</th><th>95% CI</th><th>verdict</th><th>n</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def write_report(out_dir: PathLike, results: Sequence[FigureResult], *, command: str, options: Dict[str, Any],
                 failures: Optional[Dict[str, str]] = None, stage_seconds: Optional[Dict[str, float]] = None,
                 notes: Sequence[str] = ()) -> List[Path]:
    """Writes ``RESULTS.md`` and ``index.html`` into ``out_dir`` and returns their paths.

    Args:
        out_dir: the run's output folder (figures are linked relative to it).
        results: the figures, in order.
        command: the exact command line (or Python call) that produced them.
        options: the run options (shown as a list).
        failures: ``{figure: error message}`` of figures that could not be made.
        stage_seconds: wall time per stage.
        notes: extra lines (environment caveats) for the top of the report.
    """
    root = Path(out_dir)
    failures = failures or {}
    effects = sorted((e for r in results for e in r.effects), key=lambda e: e.claim_id)  # stable: figure order within a claim
    md: List[str] = ["# erf-lab figures: results", "", f"Command: `{command}`", ""]
    if effects:
        md += _verdict_markdown(effects)
    md += [f"- {n}" for n in notes]
    md += ["", "## Options", ""] + [f"- `{k}`: `{jsonable(v)}`" for k, v in options.items()]
    md += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions("matplotlib", "scikit-learn", "pandas").items()), ""]
    if stage_seconds:
        total = sum(stage_seconds.values())
        md += ["Wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in stage_seconds.items())
               + f" (total {total:.0f}s)", ""]
    body: List[str] = []
    for r in results:
        md += [f"## {r.title}", ""]
        for img in r.images:
            md.append(f"![{r.title}]({rel([img], root)[0]})")
        md.append("")
        if r.claims:
            md += [f"- {c}" for c in r.claims] + [""]
        if r.table is not None:
            md += [markdown_table(r.table), ""]
        md += ["Files: " + ", ".join(f"`{p}`" for p in rel(r.files, root)), ""]
        imgs = "".join(f'<p><img src="{html.escape(p)}" style="max-width:100%"></p>'
                       for p in rel(r.images, root))
        claims = "".join(f"<li>{html.escape(c)}</li>" for c in r.claims)
        table = r.table.to_html(index=False, float_format=lambda v: _fmt(float(v)), border=0) if r.table is not None else ""
        links = ", ".join(f'<a href="{html.escape(p)}">{html.escape(p)}</a>' for p in rel(r.files, root))
        body.append(f"<h2>{html.escape(r.title)}</h2>{imgs}<ul>{claims}</ul>{table}<p>Data: {links}</p>")
    for name, msg in failures.items():
        md += [f"## {name}: not produced", "", f"Error: {msg}", ""]
        body.append(f"<h2>{html.escape(name)}: not produced</h2><p>Error: {html.escape(msg)}</p>")
    md_path = write_text(root / "RESULTS.md", "\n".join(md) + "\n")
    opts = "".join(f"<li><code>{html.escape(k)}</code>: <code>{html.escape(str(jsonable(v)))}</code></li>"
                   for k, v in options.items())
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>erf-lab figures</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "code{background:#f4f4f4}</style></head><body>"
        f"<h1>erf-lab figures: results</h1><p>Command: <code>{html.escape(command)}</code></p>"
        + (_verdict_html(effects) if effects else "")
        + f"<ul>{note_html}</ul><details><summary>Options</summary><ul>{opts}</ul></details>"
        + "".join(body) + "</body></html>\n"
    )
    html_path = write_text(root / "index.html", page)
    return [md_path, html_path]
