import json
from pathlib import Path

import pytest

from sftlens import evaluate as evaluate_module
from sftlens.cli import main
from sftlens.errors import SftlensError
from sftlens.evaluate import (
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    EvalConfig,
    acc_levels,
    acc_of,
    evaluate,
    evaluate_model,
    format_level_table,
    micro_of,
    summarize,
)
from sftlens.io import atomic_write_jsonl, read_jsonl

from assets import eval_rows, greedy_by_hand, hf_generate_answers

pytestmark = pytest.mark.usefixtures("private_cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_jsonl(path, rows)
    return path


@pytest.fixture
def level_files(tmp_path) -> list[Path]:
    return [write_jsonl(tmp_path / "in-level0.jsonl", eval_rows("in", 0, 7)),
            write_jsonl(tmp_path / "out-level3.jsonl", eval_rows("out", 3, 5))]


def prediction(domain, level, correct):
    return {"fact_id": "x", "domain": domain, "level": level, "prediction": "", "correct": correct}


def test_acc_is_the_mean_of_level_accuracies_not_of_facts():
    predictions = [prediction("in", 0, False)] * 10 + [prediction("in", lv, True) for lv in (1, 2, 3, 4)]
    records = summarize(predictions)
    assert [(r["test_level"], r["n"], r["accuracy"]) for r in records] == [
        (0, 10, 0.0), (1, 1, 1.0), (2, 1, 1.0), (3, 1, 1.0), (4, 1, 1.0)]
    assert acc_of(records, "in") == pytest.approx(0.8)
    assert micro_of(records, "in") == pytest.approx(4 / 14)


def test_acc_averages_only_levels_with_enough_facts():
    records = [{"domain": "in", "test_level": lv, "n": n, "correct": c, "accuracy": c / n}
               for lv, n, c in ((0, 80, 8), (1, 58, 29), (2, 19, 19), (3, 1, 1))]
    assert acc_levels(records, "in") == [0, 1]
    assert acc_of(records, "in") == pytest.approx((0.1 + 0.5) / 2)
    assert acc_of(records, "in", levels=[0, 1, 2, 3]) == pytest.approx((0.1 + 0.5 + 1 + 1) / 4)
    small = [{**r, "n": 5} for r in records]
    assert acc_levels(small, "in") == [0, 1, 2, 3], "a toy run with no large level averages all it has"


def test_records_are_per_domain_and_level():
    predictions = [prediction("out", 2, True), prediction("in", 2, False), prediction("out", 2, False)]
    assert summarize(predictions) == [
        {"domain": "in", "test_level": 2, "n": 1, "correct": 0, "accuracy": 0.0},
        {"domain": "out", "test_level": 2, "n": 2, "correct": 1, "accuracy": 0.5},
    ]
    with pytest.raises(SftlensError, match="no evaluation records for domain 'mixed'"):
        acc_of(summarize(predictions), "mixed")


def test_level_table_shows_levels_acc_and_micro():
    predictions = [prediction("in", 0, False)] * 3 + [prediction("in", 1, True)]
    table = format_level_table(summarize(predictions))
    assert "| domain | level 0 | level 1 | Acc | micro | n |" in table
    assert "| in | 0.00 | 100.00 | 50.00 | 25.00 | 4 |" in table


def test_predictions_do_not_depend_on_batch_size(tiny):
    model, tokenizer = tiny
    rows = eval_rows("in", 1, 9) + eval_rows("out", 2, 4)
    results = [evaluate_model(model, tokenizer, rows, EvalConfig(batch_size=b), progress=False) for b in (1, 4, 64)]
    assert results[0] == results[1] == results[2]
    assert [p["fact_id"] for p in results[0]] == [r["fact_id"] for r in rows]
    assert any(p["prediction"] for p in results[0])  # the random model does say something


def test_generation_is_greedy_and_bounded(tiny):
    model, tokenizer = tiny
    rows = eval_rows("in", 0, 5)
    predictions = evaluate_model(model, tokenizer, rows, EvalConfig(max_new_tokens=4, batch_size=5), progress=False)
    assert [p["prediction"] for p in predictions] == [greedy_by_hand(model, tokenizer, r["prompt"], 4) for r in rows]


def test_rows_ending_early_leave_the_batch_without_changing_a_prediction(tiny):
    """With EOS made likely, some answers end after a token or two and leave the running batch; the
    predictions equal transformers' batched generate and greedy decoding by hand, at every batch size."""
    import copy

    import torch

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 6
    rows = eval_rows("in", 0, 12) + eval_rows("out", 1, 12)
    prompts = [r["prompt"] for r in rows]
    by_hand = [greedy_by_hand(model, tokenizer, p, 8) for p in prompts]
    assert by_hand == hf_generate_answers(model, tokenizer, prompts, 8)
    lengths = {len(tokenizer(t)["input_ids"]) for t in by_hand}
    assert min(lengths) < 4 and max(lengths) >= 6  # some rows end early, others run to the budget
    for batch_size in (1, 5, 64):
        predictions = evaluate_model(model, tokenizer, rows, EvalConfig(max_new_tokens=8, batch_size=batch_size), progress=False)
        assert [p["prediction"] for p in predictions] == by_hand, batch_size


def test_correct_when_the_matcher_finds_an_answer(tiny, monkeypatch):
    model, tokenizer = tiny
    outputs = iter([["It is in France.", "no idea"]])
    monkeypatch.setattr(evaluate_module, "generate_answers", lambda *a: next(outputs))
    rows = [{**eval_rows("in", 0, 1)[0], "answers": ["France"]},
            {**eval_rows("in", 0, 1)[0], "answers": ["Italy"]}]
    predictions = evaluate_model(model, tokenizer, rows, EvalConfig(batch_size=2), progress=False)
    assert [p["correct"] for p in predictions] == [True, False]


def test_evaluate_writes_predictions_and_summary(tiny_model_dir, level_files, tmp_path):
    records = evaluate(str(tiny_model_dir), level_files, tmp_path / "eval", EvalConfig(batch_size=4), progress=False)
    assert [(r["domain"], r["test_level"], r["n"]) for r in records] == [("in", 0, 7), ("out", 3, 5)]
    predictions = read_jsonl(tmp_path / "eval" / PREDICTIONS_FILE)
    assert [p["source"] for p in predictions] == ["in-level0.jsonl"] * 7 + ["out-level3.jsonl"] * 5
    summary = json.loads((tmp_path / "eval" / SUMMARY_FILE).read_text())
    assert summary["records"] == records
    assert summary["acc"]["out"] == acc_of(records, "out")
    assert [t["count"] for t in summary["tests"]] == [7, 5]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [PREDICTIONS_FILE, SUMMARY_FILE]


def test_finished_evaluation_is_skipped_even_at_another_batch_size(tiny_model_dir, level_files, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    records = evaluate(str(tiny_model_dir), level_files, out, progress=False)
    monkeypatch.setattr(evaluate_module, "evaluate_model", lambda *a, **k: pytest.fail("evaluated again"))
    assert evaluate(str(tiny_model_dir), level_files, out, EvalConfig(batch_size=3), progress=False) == records


class Interrupt(Exception):
    pass


def test_interrupted_evaluation_resumes_where_it_stopped(tiny_model_dir, level_files, tmp_path, monkeypatch):
    config = EvalConfig(batch_size=4)
    straight = evaluate(str(tiny_model_dir), level_files, tmp_path / "straight", config, progress=False)
    original = evaluate_module.evaluate_model
    seen = []

    def die_after_first_batch(model, tokenizer, rows, config, progress, on_batch):
        def first_then_die(batch):
            on_batch(batch)
            raise Interrupt

        seen.append(len(rows))
        return original(model, tokenizer, rows, config, progress, on_batch=first_then_die)

    monkeypatch.setattr(evaluate_module, "evaluate_model", die_after_first_batch)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        evaluate(str(tiny_model_dir), level_files, out, config, progress=False)
    assert not (out / SUMMARY_FILE).exists()

    def count_rows(model, tokenizer, rows, config, progress, on_batch):
        seen.append(len(rows))
        return original(model, tokenizer, rows, config, progress, on_batch=on_batch)

    monkeypatch.setattr(evaluate_module, "evaluate_model", count_rows)
    assert evaluate(str(tiny_model_dir), level_files, out, config, progress=False) == straight
    assert seen == [12, 8]
    assert read_jsonl(out / PREDICTIONS_FILE) == read_jsonl(tmp_path / "straight" / PREDICTIONS_FILE)


def test_out_dir_holding_another_evaluation_is_an_error(tiny_model_dir, level_files, tmp_path):
    out = tmp_path / "eval"
    evaluate(str(tiny_model_dir), level_files[:1], out, progress=False)
    before = (out / SUMMARY_FILE).read_text()
    with pytest.raises(SftlensError, match="eval: holds another evaluation"):
        evaluate(str(tiny_model_dir), level_files, out, progress=False)
    assert (out / SUMMARY_FILE).read_text() == before
    foreign = tmp_path / "model-like"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(SftlensError, match=r"not an sftlens evaluation \(config.json\)"):
        evaluate(str(tiny_model_dir), level_files, foreign, progress=False)


def test_bad_test_files_name_file_and_key(tiny_model_dir, tmp_path):
    rows = eval_rows("in", 0, 2)
    del rows[1]["level"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SftlensError, match=r"bad.jsonl:2: missing key 'level'"):
        evaluate(str(tiny_model_dir), [bad], tmp_path / "eval", progress=False)
    with pytest.raises(SftlensError, match=r"missing.jsonl: no such file"):
        evaluate(str(tiny_model_dir), [tmp_path / "missing.jsonl"], tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()


def test_cli_prints_the_level_table(tiny_model_dir, tmp_path, capsys):
    split = tmp_path / "split"
    (split / "test").mkdir(parents=True)
    for domain in ("in", "out"):
        for level in range(5):  # a split leaves a level empty when the base model has no facts there
            write_jsonl(split / "test" / f"{domain}-level{level}.jsonl", eval_rows(domain, level, 2 if level < 4 else 0))
    code = main(["eval", "--model", str(tiny_model_dir), "--split-dir", str(split), "--out", str(tmp_path / "e"),
                 "--batch-size", "8", "--max-new-tokens", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| domain | level 0 | level 1 | level 2 | level 3 | Acc | micro | n |" in out  # no level-4 facts
    assert "| in |" in out and "| out |" in out and out.rstrip().endswith("| 8 |")
    empty = [str(split / "test" / f"{domain}-level4.jsonl") for domain in ("in", "out")]
    assert main(["eval", "--model", str(tiny_model_dir), "--test", *empty, "--out", str(tmp_path / "e3")]) == 2
    assert "(all empty)" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "e2")]) == 2
    assert "give either --test" in capsys.readouterr().err
