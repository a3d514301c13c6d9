"""The report's Table 2 and Figure 2 (`sftlens.study.report.sections`) against values computed here by hand
from the records (through the figure layer, `sftlens.reporting.figures`), and the statistic over seeds
(`sftlens.study.report.results.mean_spread`)."""

import statistics

import matplotlib.image
import pytest

from sftlens.study.report.results import mean_spread, size_sort_key
from sftlens.study.report.sections import SMALL, figure2, table2


def accuracy(train_level, size, seed, domain, test_level) -> float:
    """A made-up but non-trivial accuracy surface."""
    level = 5 if train_level == "mixed" else train_level
    base = {"in": 0.5, "out": 0.4}[domain]
    return round(base + 0.1 * test_level - 0.02 * level * (size / 1920 if size != "all" else 1) + 0.01 * seed, 6)


def make_records(train_levels=(0, 2), sizes=(1920,), seeds=(0, 1, 2), n=40) -> list[dict]:
    """Study records of fine-tuned models on test (every level with `n` facts)."""
    records = []
    for train_level in train_levels:
        for size in sizes:
            for seed in seeds:
                for domain in ("in", "out"):
                    for test_level in range(5):
                        acc = accuracy(train_level, size, seed, domain, test_level)
                        records.append({"train_level": train_level, "size": size, "seed": seed, "domain": domain,
                                        "test_level": test_level, "n": n, "correct": round(acc * n),
                                        "accuracy": acc, "split": "test", "strategy": "sft", "restore_ratio": 0.0})
    return records


def cell(values: list[float]) -> str:
    """A report cell by hand: mean ± sample sd over seeds, in %, one decimal."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def test_table2_layout_and_values():
    section = table2(make_records(), 1920)
    (_, header, rows), = section.tables
    assert header == ["train set", "in 0", "in 1", "in 2", "in 3", "in 4", "in Acc",
                      "out 0", "out 1", "out 2", "out 3", "out 4", "out Acc"]
    assert rows[0][:6] == ["n (test facts)", "40", "40", "40", "40", "40"]
    assert [row[0] for row in rows[1:]] == ["D_train-0", "D_train-2"]
    assert rows[2][header.index("in 3")] == cell([accuracy(2, 1920, s, "in", 3) for s in (0, 1, 2)])
    assert rows[1][header.index("out 0")] == cell([accuracy(0, 1920, s, "out", 0) for s in (0, 1, 2)])


def test_table2_acc_is_the_mean_of_level_accuracies_per_run_then_over_seeds():
    records = make_records(train_levels=(1,), seeds=(0, 1))
    for r in records:  # a level of many facts at accuracy 0: Acc weighs levels, not facts
        if r["seed"] == 1 and r["test_level"] == 0:
            r["n"], r["correct"], r["accuracy"] = 1000, 0, 0.0
    (_, header, rows), = table2(records, 1920).tables
    per_seed = [statistics.fmean(r["accuracy"] for r in records if r["seed"] == s and r["domain"] == "in")
                for s in (0, 1)]
    assert rows[1][header.index("in Acc")] == cell(per_seed)


def test_table2_marks_small_levels_and_orders_mixed_last():
    records = make_records(train_levels=(3, 1), n=40) + make_records(train_levels=("mixed",), n=40)
    for r in records:
        if r["test_level"] == 4:
            r["n"] = 7
    (_, header, rows), = table2(records, 1920).tables
    assert [row[0] for row in rows[1:]] == ["D_train-1", "D_train-3", "mixed"]
    assert rows[0][header.index("in 4")] == f"7{SMALL}" and rows[1][header.index("in 4")].endswith(SMALL)
    assert not rows[1][header.index("in 3")].endswith(SMALL)
    # Acc leaves out the small level
    acc = [statistics.fmean(accuracy(1, 1920, s, "in", lv) for lv in range(4)) for s in (0, 1, 2)]
    assert rows[1][header.index("in Acc")] == cell(acc)
    assert table2(records, 60).text == "No models of this size."


def test_figure2_has_a_line_per_training_level_sizes_ascending_and_all_last(tmp_path):
    records = make_records(train_levels=(0, 4), sizes=(960, 240), seeds=(0, 1)) + [
        {**r, "size": "all"} for r in make_records(train_levels=(0, 4), sizes=(1920,), seeds=(0, 1))]
    section = figure2(records, tmp_path / "fig" / "figure2.png")
    (_, header, rows), = section.tables
    assert header[2:5] == ["240", "960", "all"]
    assert [row[:2] for row in rows] == [["in-domain", "D_train-0"], ["in-domain", "D_train-4"],
                                         ["out-of-domain", "D_train-0"], ["out-of-domain", "D_train-4"]]
    acc = [statistics.fmean(accuracy(4, 960, s, "in", lv) for lv in range(5)) for s in (0, 1)]
    assert rows[1][3] == cell(acc)
    assert section.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(section.figure).shape
    assert width == 1200 and height == 480  # two 5x4-inch panels at 120 dpi


def test_mean_spread_is_the_statistic_over_seeds():
    assert mean_spread([0.2, None, 0.4]) == (pytest.approx(0.3), pytest.approx(statistics.stdev([0.2, 0.4])), 2)
    assert mean_spread([0.5]) == (0.5, 0.0, 1)
    mean, spread, n = mean_spread([None])
    assert n == 0 and mean != mean and spread != spread
    assert sorted(["all", 240, 60], key=size_sort_key) == [60, 240, "all"]
