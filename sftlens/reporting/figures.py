"""The figure layer of every report: Agg `Figure` objects (no pyplot state), PNGs written atomically.

`plot_series` (lines over training sizes: Figures 2 and 4), `plot_bands` (curves with 95 % bands: the
restoration and repair curves), and `figure_panels`/`save_figure` for any other figure (the audit's,
the concentration plot of `deltas`).
"""

from __future__ import annotations

import io
from pathlib import Path

from sftlens.io import atomic_write_bytes


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
