import csv
import io
import statistics

import pytest

from sftlens.errors import SftlensError
from sftlens.report import (
    Stat, acc_vs_size, level_table, plot_series, size_sort_key, select, to_csv, to_markdown, write_table,
)


def accuracy(train_level, size, seed, domain, test_level) -> float:
    """A made-up but non-trivial accuracy surface."""
    base = {"in": 0.5, "out": 0.4}[domain]
    return round(base + 0.1 * test_level - 0.02 * train_level * (size / 1920) + 0.01 * seed, 6)


def make_records(train_levels=(0, 2), sizes=(1920,), seeds=(0, 1, 2), n=10) -> list[dict]:
    records = []
    for train_level in train_levels:
        for size in sizes:
            for seed in seeds:
                for domain in ("in", "out"):
                    for test_level in range(5):
                        acc = accuracy(train_level, size, seed, domain, test_level)
                        records.append({"train_level": train_level, "size": size, "seed": seed, "domain": domain,
                                        "test_level": test_level, "n": n, "correct": round(acc * n),
                                        "accuracy": acc})
    return records


def test_level_table_layout_and_values():
    table = level_table(make_records())
    assert table.columns == ("train level", "in 0", "in 1", "in 2", "in 3", "in 4", "in Acc",
                             "out 0", "out 1", "out 2", "out 3", "out 4", "out Acc")
    assert [row[0] for row in table.rows] == [0, 2]
    cell = table.rows[1][table.columns.index("in 3")]
    values = [100 * accuracy(2, 1920, s, "in", 3) for s in (0, 1, 2)]
    assert cell.mean == pytest.approx(statistics.fmean(values))
    assert cell.std == pytest.approx(statistics.stdev(values)) and cell.n == 3


def test_acc_column_is_the_mean_of_level_accuracies_per_run_then_over_seeds():
    records = make_records(train_levels=(1,), seeds=(0, 1), n=40)  # every level large enough to count
    # make level 0 of seed 1 a large level: Acc must ignore n
    for r in records:
        if r["seed"] == 1 and r["test_level"] == 0:
            r["n"], r["correct"] = 1000, 0
            r["accuracy"] = 0.0
    table = level_table(records)
    acc = table.rows[0][table.columns.index("in Acc")]
    per_seed = [statistics.fmean(100 * r["accuracy"] for r in records if r["seed"] == s and r["domain"] == "in")
                for s in (0, 1)]
    assert acc.mean == pytest.approx(statistics.fmean(per_seed))
    assert acc.std == pytest.approx(statistics.stdev(per_seed))


def test_markdown_shows_mean_plus_minus_spread():
    md = to_markdown(level_table(make_records(seeds=(0,))))
    lines = md.splitlines()
    assert lines[0].startswith("| train level | in 0 |") and lines[1].startswith("|---|")
    expected = f"{100 * accuracy(0, 1920, 0, 'in', 0):.2f} ± 0.00"
    assert lines[2].startswith(f"| 0 | {expected} |")


def test_csv_splits_mean_and_spread_into_columns(tmp_path):
    table = level_table(make_records())
    rows = list(csv.reader(io.StringIO(to_csv(table))))
    assert rows[0][:3] == ["train level", "in 0 mean", "in 0 std"]
    assert len(rows[0]) == 1 + 2 * 12 and len(rows) == 3
    stat = table.rows[0][1]
    assert float(rows[1][1]) == pytest.approx(stat.mean) and float(rows[1][2]) == pytest.approx(stat.std)
    md, csv_path = write_table(table, tmp_path / "tables" / "table2")
    assert md.read_text() == to_markdown(table) and csv_path.read_text() == to_csv(table)


def test_named_training_levels_sort_after_numeric_ones():
    records = make_records(train_levels=(3, 1)) + [
        {**r, "train_level": "mixed"} for r in make_records(train_levels=(0,))]
    assert [row[0] for row in level_table(records).rows] == [1, 3, "mixed"]


def test_mixed_sizes_need_a_choice_and_duplicates_are_errors():
    records = make_records(sizes=(240, 1920))
    with pytest.raises(SftlensError, match="span training sizes 240, 1920; pick one with size="):
        level_table(records)
    assert level_table(records, size=240).rows[0][1] == level_table(select(records, size=240)).rows[0][1]
    with pytest.raises(SftlensError, match="no evaluation records for size 60"):
        level_table(records, size=60)
    doubled = make_records() + make_records(train_levels=(0,), seeds=(0,))
    with pytest.raises(SftlensError, match="two evaluation records for train_level=0, size=1920, seed=0"):
        level_table(doubled)
    with pytest.raises(SftlensError, match="record 1: missing key 'seed'"):
        level_table([{"train_level": 0, "size": 1, "domain": "in", "test_level": 0, "accuracy": 1.0}])


def test_acc_vs_size_series_has_a_line_per_training_level():
    records = make_records(train_levels=(0, 4), sizes=(960, 240, 1920), seeds=(0, 1))
    series = acc_vs_size(records)
    assert list(series) == ["in", "out"] and list(series["out"]) == [0, 4]
    points = series["in"][4]
    assert [size for size, _ in points] == [240, 960, 1920]
    acc = [statistics.fmean(100 * accuracy(4, 1920, s, "in", lv) for lv in range(5)) for s in (0, 1)]
    assert points[2][1] == Stat(pytest.approx(statistics.fmean(acc)), pytest.approx(statistics.stdev(acc)), 2)


def figure2(records: list[dict], path):
    """Figure 2 from the record layer: Acc over seeds per (domain, level, size), one panel per domain."""
    series = acc_vs_size(records)
    sizes = sorted({size for lines in series.values() for points in lines.values() for size, _ in points},
                   key=size_sort_key)
    panels = [(domain, {f"train-{lv}": {size: (st.mean, st.std, st.n) for size, st in points}
                        for lv, points in lines.items()}) for domain, lines in series.items()]
    return plot_series(path, panels, "Acc (%)", sizes, scale=1.0, references=[30.0, None])


def test_figure_is_a_png_with_two_panels(tmp_path):
    import matplotlib.image

    path = figure2(make_records(sizes=(60, 240, 1920)), tmp_path / "fig" / "figure2.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width == 1200 and height == 480  # two 5x4-inch panels at 120 dpi


def test_figure_places_size_all_last(tmp_path):
    records = make_records(sizes=(240, 60), seeds=(0,)) + [
        {**r, "size": "all"} for r in make_records(sizes=(1920,), seeds=(0,))]
    assert [size for size, _ in acc_vs_size(records)["in"][0]] == [60, 240, "all"]
    path = figure2(records, tmp_path / "figure2.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
