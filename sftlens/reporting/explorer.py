"""An explorer: one table of every row of a report (the audit's facts), filtered by selects, searched
by a text box, sorted by a click on a column header, in the self-contained HTML page (no network).
`explorer_html` writes the controls and an empty table, the rows as JSON in a
`<script type="application/json">` and the vanilla JavaScript that draws them
(`resources/explorer.js`, generic over the columns); it goes in a page as a `Section`'s `html`.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from importlib import resources

NUM = ' class="num"'  # the page's right-aligned column (`sftlens.reporting.page`)

@dataclass(frozen=True)
class Column:
    key: str  # the row's field
    label: str
    numeric: bool = False  # right-aligned, sorted as numbers
    digits: int | None = None  # a number's decimals (None: as it is)
    right: str | None = None  # an answer: the row's boolean field saying whether it is right (shown ✓ / ✗)


@dataclass(frozen=True)
class Filter:
    key: str  # rows whose field equals the chosen value (compared as text)
    label: str
    values: tuple  # the choices, in order


def script_json(data) -> str:
    """`data` as JSON safe inside a <script> element: no `<` at all (so no `</script>` or `<!--`)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def explorer_script() -> str:
    return resources.files("sftlens.resources").joinpath("explorer.js").read_text(encoding="utf-8")


def explorer_html(name: str, rows: list[dict], columns: list[Column], filters: list[Filter],
                  search: list[str], row_id: str) -> str:
    """The explorer `name` (its element id) of `rows`; `search`: the fields the text box looks in;
    `row_id`: the field each table row carries as `data-id`."""
    esc = html.escape
    controls = [f'<label>{esc(f.label)} <select data-key="{esc(f.key)}"><option value="">all</option>'
                + "".join(f'<option value="{esc(str(v))}">{esc(str(v))}</option>' for v in f.values)
                + "</select></label>" for f in filters]
    controls.append('<label>search <input type="search" placeholder="any words of the row"></label>')
    sticky = "position:sticky;top:0;background:#fff;cursor:pointer;user-select:none"
    header = "".join(f'<th data-key="{esc(c.key)}"{NUM if c.numeric else ""} style="{sticky}" '
                     f'title="sort by {esc(c.label)}">{esc(c.label)}</th>' for c in columns)
    data = {"columns": [asdict(c) for c in columns], "rows": rows, "search": search, "id": row_id}
    return (f'<div class="explorer" id="{esc(name)}">'
            f'<p>{" ".join(controls)} <output class="explorer-count"></output></p>'
            '<noscript><p>The explorer needs JavaScript.</p></noscript>'
            '<div style="max-height:80vh;overflow:auto">'
            f'<table><thead><tr>{header}</tr></thead><tbody></tbody></table></div>'
            f'<script type="application/json">{script_json(data)}</script>'
            f"<script>{explorer_script()}</script></div>")
