"""The one Markdown table writer: every table a stage prints and every table of a report."""

from __future__ import annotations


def markdown_table(header: list, rows: list[list], align: str = "") -> str:
    """A GitHub Markdown table (no trailing newline). `align` has one letter per column, `l` or `r`
    (right-aligned, for numbers); empty = all left."""
    align = align or "l" * len(header)
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    lines = ["| " + " | ".join(map(str, header)) + " |", rule]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
