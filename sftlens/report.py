"""Tables and figures from stored evaluation records (paper Table 2 and Figure 2).

Input everywhere: the long-format evaluation records of ARCHITECTURE.md (one per model x domain
x test level: `domain`, `test_level`, `n`, `correct`, `accuracy`) plus the run's `train_level`,
`size` and `seed`. A run's Acc is the mean of its level accuracies (the paper's metric); tables
and figures then show the mean over seeds with the sample standard deviation as the spread.

A `Table` holds plain cells and `Stat` cells; `to_markdown` writes a Stat as "mean ± std", while
`to_csv` splits it into `<column> mean` and `<column> std` columns for further processing.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from sftlens.errors import SftlensError
from sftlens.evaluate import acc_of
from sftlens.io import atomic_write_bytes, atomic_write_text
from sftlens.markdown import markdown_table

DOMAINS = ("in", "out")
DOMAIN_TITLES = {"in": "in-domain", "out": "out-of-domain"}
RUN_KEYS = ("train_level", "size", "seed")
RECORD_KEYS = (*RUN_KEYS, "domain", "test_level", "accuracy")


@dataclass(frozen=True)
class Stat:
    """A value over seeds: mean, sample standard deviation (0 for a single seed) and count."""

    mean: float
    std: float
    n: int


def mean_spread(values: list[float | None]) -> tuple[float, float, int]:
    """The one statistic over seeds: mean, sample standard deviation (0 for one value) and count;
    missing values (None) are left out, none at all gives NaNs and 0."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def seed_stat(values: list[float], scale: float = 100.0) -> Stat:
    return Stat(*mean_spread([scale * v for v in values]))


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple, ...]
    digits: int = 2


def _level_sort_key(level) -> tuple:
    """Numeric training levels first (0..4), then named mixtures such as 'mixed'."""
    return (0, level, "") if isinstance(level, (int, float)) else (1, 0, str(level))


def _check_records(records: list[dict]) -> None:
    if not records:
        raise SftlensError("no evaluation records to report")
    seen = set()
    for number, record in enumerate(records, 1):
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise SftlensError(f"evaluation record {number}: missing key {missing[0]!r}")
        key = tuple(record[k] for k in (*RUN_KEYS, "domain", "test_level"))
        if key in seen:
            raise SftlensError(
                "two evaluation records for train_level={}, size={}, seed={}, domain={}, test_level={}; "
                "select one kind of run (e.g. no restored models) first".format(*key))
        seen.add(key)


def select(records: list[dict], **criteria) -> list[dict]:
    """The records whose fields equal every given value, e.g. select(records, size=1920)."""
    return [r for r in records if all(r.get(k) == v for k, v in criteria.items())]


def runs(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by run: (train_level, size, seed) -> that run's records."""
    _check_records(records)
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        grouped.setdefault(tuple(record[k] for k in RUN_KEYS), []).append(record)
    return grouped


def _single_size(records: list[dict], size) -> list[dict]:
    if size is not None:
        chosen = select(records, size=size)
        if not chosen:
            raise SftlensError(f"no evaluation records for size {size}")
        return chosen
    sizes = sorted({r.get("size") for r in records}, key=_level_sort_key)
    if len(sizes) > 1:
        raise SftlensError(f"records span training sizes {', '.join(map(str, sizes))}; pick one with size=")
    return records


def level_table(records: list[dict], size=None, domains: tuple[str, ...] = DOMAINS, digits: int = 2) -> Table:
    """Table 2: one row per training level; per domain, accuracy (%) on each test level, then Acc.

    Each cell is the mean over seeds with its spread; Acc is taken per run before averaging.
    """
    grouped = runs(_single_size(records, size))
    levels = sorted({r["test_level"] for r in records if r["domain"] in domains}, key=_level_sort_key)
    columns = ["train level"]
    for domain in domains:
        columns += [f"{domain} {level}" for level in levels] + [f"{domain} Acc"]
    rows = []
    for train_level in sorted({key[0] for key in grouped}, key=_level_sort_key):
        seeds = [recs for key, recs in grouped.items() if key[0] == train_level]
        row: list = [train_level]
        for domain in domains:
            for level in levels:
                values = [r["accuracy"] for recs in seeds for r in recs
                          if r["domain"] == domain and r["test_level"] == level]
                row.append(seed_stat(values) if values else None)
            accs = [acc_of(recs, domain) for recs in seeds if any(r["domain"] == domain for r in recs)]
            row.append(seed_stat(accs) if accs else None)
        rows.append(tuple(row))
    return Table(tuple(columns), tuple(rows), digits)


def _cell_text(cell, digits: int) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, Stat):
        return f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}"
    return str(cell)


def to_markdown(table: Table) -> str:
    return markdown_table(list(table.columns), [[_cell_text(c, table.digits) for c in row] for row in table.rows]) + "\n"


def _stat_columns(table: Table) -> set[int]:
    return {i for row in table.rows for i, cell in enumerate(row) if isinstance(cell, Stat)}


def to_csv(table: Table) -> str:
    """One header row; a Stat column becomes `<name> mean`, `<name> std` (full precision)."""
    stats = _stat_columns(table)
    header = []
    for i, name in enumerate(table.columns):
        header += [f"{name} mean", f"{name} std"] if i in stats else [name]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        out = []
        for i, cell in enumerate(row):
            if i in stats:
                out += [cell.mean, cell.std] if isinstance(cell, Stat) else ["", ""]
            else:
                out.append("" if cell is None else cell)
        writer.writerow(out)
    return buffer.getvalue()


def write_table(table: Table, stem: str | Path) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.csv` atomically."""
    stem = Path(stem)
    md, csv_path = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".csv")
    atomic_write_text(md, to_markdown(table))
    atomic_write_text(csv_path, to_csv(table))
    return md, csv_path


def size_sort_key(size) -> tuple:
    """Training sizes ascending, then "all" (a level's every fact)."""
    return (1, 0) if size == "all" else (0, size)


def acc_vs_size(records: list[dict], domains: tuple[str, ...] = DOMAINS) -> dict[str, dict]:
    """Figure 2 data: domain -> training level -> [(size, Stat of Acc over seeds)], sizes ascending."""
    grouped = runs(records)
    series: dict[str, dict] = {}
    for domain in domains:
        lines: dict = {}
        for (train_level, size, _seed), recs in grouped.items():
            if any(r["domain"] == domain for r in recs):
                lines.setdefault(train_level, {}).setdefault(size, []).append(acc_of(recs, domain))
        series[domain] = {
            level: [(size, seed_stat(by_size[size])) for size in sorted(by_size, key=size_sort_key)]
            for level, by_size in sorted(lines.items(), key=lambda kv: _level_sort_key(kv[0]))}
    return series


def figure_panels(panels: int, width: float = 5.0):
    """A figure of `panels` axes side by side, on Agg without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * panels, 4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _finish_axis(ax, title: str, ylabel: str, xlabel: str, reference: float | None) -> None:
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="base model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def save_figure(figure, path: str | Path) -> Path:
    """Every figure of sftlens is written this way: PNG at 120 dpi, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_series(path: str | Path, panels: list[tuple[str, dict]], ylabel: str, sizes: list,
                scale: float = 100.0, references: list[float | None] | None = None) -> Path:
    """Lines over training sizes, a panel per (title, {label: {size: (mean, spread, n)}}), error
    bars = spread over seeds; `references` puts a dashed base-model line in each panel. Sizes sit at
    equal steps: the paper's sizes double (60 ... 1920), and "all" goes last."""
    figure, axes = figure_panels(len(panels))
    for i, (ax, (title, lines)) in enumerate(zip(axes, panels)):
        for label, points in lines.items():
            xs = [i for i, size in enumerate(sizes) if size in points and points[size][2] > 0]
            if xs:
                ax.errorbar(xs, [points[sizes[i]][0] * scale for i in xs], yerr=[points[sizes[i]][1] * scale for i in xs],
                            marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        reference = references[i] if references else None
        _finish_axis(ax, title, ylabel, "training examples", None if reference is None else reference * scale)
    return save_figure(figure, path)


def plot_bands(path: str | Path, panels: list[tuple[str, dict]], ylabel: str, xlabel: str,
               references: list[float | None] | None = None, scale: float = 100.0) -> Path:
    """Curves with 95 % bands, a panel per (title, {label: [(x, value, low, high)]}); x values sit
    at equal steps (restore ratios 0, 1, 5, 20 ... are not evenly spaced). A label with one point
    is drawn as a point with an error bar."""
    figure, axes = figure_panels(len(panels))
    for i, (ax, (title, curves)) in enumerate(zip(axes, panels)):
        xs = sorted({x for points in curves.values() for x, *_ in points})
        at = {x: j for j, x in enumerate(xs)}
        for label, points in curves.items():
            points = sorted(points)
            pos = [at[x] for x, *_ in points]
            values, lows, highs = ([p[k] * scale for p in points] for k in (1, 2, 3))
            if len(points) == 1:
                ax.errorbar(pos, values, yerr=[[values[0] - lows[0]], [highs[0] - values[0]]], marker="s",
                            capsize=4, linestyle="none", label=label)
            else:
                line = ax.plot(pos, values, marker="o", label=label)[0]
                ax.fill_between(pos, lows, highs, alpha=0.2, color=line.get_color())
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        reference = references[i] if references else None
        _finish_axis(ax, title, ylabel, xlabel, None if reference is None else reference * scale)
    return save_figure(figure, path)
