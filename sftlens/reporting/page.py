"""Report pages, the one writer of the study report and the audit report: a report is a list of
`Section`s (title, text, tables, a figure, and raw HTML the HTML page alone shows: an explorer),
written as Markdown with the PNGs beside it and as a self-contained HTML page (`write_sections`), or as a
results page headed by a preamble (`write_page`).
Text columns are left-aligned, numbers right-aligned (`numeric_columns`); `interval_text` is the one
spelling of a bootstrap estimate in a cell."""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.io import atomic_write_bytes, atomic_write_text
from sftlens.markdown import markdown_table


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)  # (caption, header, rows)
    figure: Path | None = None
    html: str = ""  # raw HTML after the tables, in the HTML page only (an interactive part: `sftlens.reporting.explorer`)


def interval_text(estimate, scale: float = 100.0, digits: int = 1, sign: str = "+") -> str:
    """A bootstrap estimate as "value [low, high]" (signed by default: a gain)."""
    return (f"{estimate.value * scale:{sign}.{digits}f} "
            f"[{estimate.low * scale:{sign}.{digits}f}, {estimate.high * scale:{sign}.{digits}f}]")


def _markdown(title: str, parts: list[Section], preamble: list[str] = ()) -> str:
    lines = [f"# {title}", "", *preamble, *([""] if preamble else [])]
    for s in parts:
        lines += [f"## {s.title}", "", s.text, ""]
        if s.figure:
            lines += [f"![{s.title}]({s.figure.name})", ""]
        for caption, header, rows in s.tables:
            if caption:
                lines += [f"*{caption}*", ""]
            align = "".join("r" if n else "l" for n in numeric_columns(rows, len(header)))
            lines += [markdown_table(header, rows, align), ""]
    return "\n".join(lines)


def _html(title: str, parts: list[Section]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for s in parts:
        body += [f"<h2>{esc(s.title)}</h2>", f"<p>{esc(s.text)}</p>"]
        if s.figure:
            data = base64.b64encode(s.figure.read_bytes()).decode()
            body.append(f'<img alt="{esc(s.title)}" src="data:image/png;base64,{data}">')
        for caption, header, rows in s.tables:
            numeric = numeric_columns(rows, len(header))
            body.append("<table>" + (f"<caption>{esc(caption)}</caption>" if caption else ""))
            body.append("<tr>" + "".join(f"<th{_align(n)}>{esc(str(h))}</th>" for h, n in zip(header, numeric)) + "</tr>")
            body += ["<tr>" + "".join(f"<td{_align(n)}>{esc(str(c))}</td>" for c, n in zip(row, numeric)) + "</tr>"
                     for row in rows]
            body.append("</table>")
        if s.html:
            body.append(s.html)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.num{text-align:right}"
             "caption{font-style:italic}img{max-width:100%}")
    head = f"<meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


# A cell reads as a number when it starts like one ("12.3 ± 0.4", "+1.2 [-0.3, +2.5] holds", "1,024");
# empty cells and dashes say nothing either way.
_NUMBER = re.compile(r"^\s*[-+−]?(\d|\.\d)")
_BLANK = ("", "–", "-", "—")


def numeric_columns(rows: list[list], width: int) -> list[bool]:
    """Per column of `width`: whether every filled cell is a number (right-aligned) or not (text, left-aligned)."""
    columns = [[str(row[i]).strip() for row in rows if i < len(row) and str(row[i]).strip() not in _BLANK]
               for i in range(width)]
    return [bool(cells) and all(_NUMBER.match(c) for c in cells) for cells in columns]


def _align(numeric: bool) -> str:
    return ' class="num"' if numeric else ""


def write_sections(title: str, parts: list[Section], out: Path, stem: str = "report") -> dict[str, Path]:
    """`{stem}.md` and a self-contained `{stem}.html` of `parts` under `out`: the one report layer
    (the study report and the audit report)."""
    atomic_write_text(out / f"{stem}.md", _markdown(title, parts))
    atomic_write_bytes(out / f"{stem}.html", _html(title, parts).encode("utf-8"))
    return {"html": out / f"{stem}.html", "markdown": out / f"{stem}.md"}


def write_page(page: Path, title: str, parts: list[Section], preamble: list[str]) -> Path:
    """A results page: the report's Markdown headed by `preamble`, its PNGs beside it."""
    atomic_write_text(page, _markdown(title, _with_figures_beside(parts, page), preamble))
    return page


def _with_figures_beside(parts: list[Section], page: Path) -> list[Section]:
    """The report's sections with their PNGs copied beside `page` as `<page stem>-<figure>.png`."""
    out = []
    for part in parts:
        if part.figure:
            copy = page.parent / f"{page.stem}-{part.figure.name}"
            atomic_write_bytes(copy, part.figure.read_bytes())
            part = dataclasses.replace(part, figure=copy)
        out.append(part)
    return out
