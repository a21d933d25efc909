"""HTML assembly: one self-contained page (inline CSS, images as data URIs, no scripts).

Every text that comes from data (names, paths, config) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import math
import numbers
from html import escape

import pandas as pd

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f8f9fb; }
td.best { font-weight: bold; background: #e3f4e1; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; margin: .3em 0; }
figure { margin: 1em 0 1.6em; }
figcaption { font-size: 14px; color: #333; max-width: 1100px; }
p.note { font-style: italic; color: #8a5a00; margin: .3em 0; }
p.meta, p.hint { color: #555; font-size: 14px; }
pre { background: #f6f8fa; border: 1px solid #ddd; padding: .8em; overflow-x: auto;
      font-size: 13px; }
nav ul { columns: 2; font-size: 14px; }
details > summary { cursor: pointer; font-weight: 600; }
"""


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell: fixed ``digits`` for floats, "—" for NaN/None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and value.is_integer() and digits == 0:
        return str(int(value))
    if isinstance(value, numbers.Number):
        return f"{value:.{digits}f}"
    return escape(str(value))


def note(text: str) -> str:
    """A short italic note (something is missing)."""
    return f'<p class="note">{escape(text)}</p>\n'


def notes(texts: list[str]) -> str:
    return "".join(note(t) for t in texts)


def para(text: str, cls: str = "hint") -> str:
    return f'<p class="{cls}">{escape(text)}</p>\n'


def figure(uri: str | None, caption: str, alt: str) -> str:
    """An embedded PNG (data URI) with a caption; a note if there is no image."""
    if uri is None:
        return note(f"No figure: {caption}")
    return (f'<figure><img src="{uri}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>\n")


def section(anchor: str, title: str, body: str, level: int = 2) -> str:
    return f'<h{level} id="{escape(anchor)}">{escape(title)}</h{level}>\n{body}'


def simple_table(df: pd.DataFrame, digits: dict[str, int] | None = None,
                 markup: tuple[str, ...] = ()) -> str:
    """A plain table, cells escaped (except the columns in ``markup``, already HTML); numeric
    columns right-aligned with ``digits`` decimals."""
    if df.empty:
        return note("(empty table)")
    digits = digits or {}
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            if isinstance(v, numbers.Number) and not isinstance(v, bool):
                cells.append(f'<td class="num">{fmt(float(v), digits.get(c, 2))}</td>')
            else:
                cells.append(f"<td>{v if c in markup else escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>\n")


def score_table_html(table: pd.DataFrame, fixed_threshold: float,
                     lower_better: tuple[str, ...] = ("VOI_M", "VOI_S", "VOI", "ARAND"),
                     higher_better: tuple[str, ...] = ("NERL",)) -> str:
    """The paper-style table of :func:`tokenunify.report.tables.score_table`.

    Column groups in the table's order: the threshold chosen on validation data (when
    present), the fixed threshold, and the best threshold on the test data itself (an oracle,
    shown for reference); in each, the lowest value of every ``lower_better`` column and the
    highest of every ``higher_better`` column present is bold.
    """
    labels = {"validated": "at the threshold chosen on the validate datasets (min mean VOI)",
              "fixed": f"at the fixed threshold {fixed_threshold:g} (nearest available)",
              "best": "at the best threshold on this test set (oracle, for reference only)"}
    groups = {b: labels[b] for b in dict.fromkeys(table.columns.get_level_values(0))}
    top = ['<th rowspan="2">experiment</th>']
    sub = []
    for block, label in groups.items():
        names = list(table[block].columns)
        top.append(f'<th colspan="{len(names)}">{escape(label)}</th>')
        sub += [f"<th>{escape(n)}</th>" for n in names]
    best = {(b, n): table[(b, n)].min(skipna=True) for b in groups for n in lower_better}
    best |= {(b, n): table[(b, n)].max(skipna=True) for b in groups for n in higher_better
             if (b, n) in table.columns}
    rows = []
    for exp, r in table.iterrows():
        cells = [f"<th>{escape(str(exp))}</th>"]
        for block in groups:
            for n in table[block].columns:
                v = r[(block, n)]
                digits = 0 if n == "segments" else 3
                bold = (block, n) in best and pd.notna(v) and v == best[(block, n)]
                cls = "num best" if bold else "num"
                cells.append(f'<td class="{cls}">{fmt(None if pd.isna(v) else float(v), digits)}'
                             "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(top) + "</tr><tr>" + "".join(sub)
            + "</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n")


def page(title: str, generated: str, toc: list[tuple[str, str]], body: str) -> str:
    """The whole HTML document."""
    nav = "".join(f'<li><a href="#{escape(a)}">{escape(t)}</a></li>' for a, t in toc)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n<p class=\"meta\">Generated {escape(generated)}</p>\n"
            f"<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n")
