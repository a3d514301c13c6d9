"""Mastery probing: level boundaries, batch/shard invariance, kill-and-resume, store checks, tables."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from sftlens import decoding
from sftlens.cli import main
from sftlens.data import Fact, RelationTemplates, encode_prompt, load_fact_set, load_templates, sft_prompt
from sftlens.data.facts import QUESTION_TEMPLATE
from sftlens.errors import SftlensError
from sftlens.probe import (
    ProbeConfig,
    ProbeRecord,
    batching,
    best_templates,
    generate_samples,
    level_counts,
    level_counts_table,
    load_probe,
    mastery_level,
    probe_facts,
    prompt_ids,
    run_probe,
    sampling,
    store,
    write_level_tables,
)

from assets import COMMON_ANSWERS, QUICK, common_facts, reference_correct

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU thread spin-waits dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("correct", "total", "level"),
    [(0, 210, 0), (1, 210, 1), (1, 4, 1), (10, 40, 1), (2501, 10000, 2), (2, 4, 2), (3, 4, 3),
     (7501, 10000, 4), (209, 210, 4), (210, 210, 4)],
)
def test_mastery_level_boundaries(correct, total, level):
    assert mastery_level(correct, total) == level
    assert ProbeRecord("P17/test/00000", correct, total, (correct,)).level == level


def test_mastery_level_rejects_impossible_counts():
    with pytest.raises(SftlensError, match="3 correct of 2"):
        mastery_level(3, 2)
    with pytest.raises(SftlensError):
        mastery_level(0, 0)


def test_probe_record_rate_and_row_round_trip():
    record = ProbeRecord("P17/test/00001", 21, 210, tuple([1] * 21))
    assert record.R == pytest.approx(0.1)
    assert ProbeRecord.from_row(record.to_row(), "x") == record
    with pytest.raises(SftlensError, match="inconsistent counts"):
        ProbeRecord.from_row({**record.to_row(), "correct": 5}, "x")


def test_config_defaults_are_the_papers():
    config = ProbeConfig()
    assert (config.samples, config.temperature, config.max_new_tokens, config.templates) == (10, 0.7, 32, ())
    assert config.stop_at_newline is False and config.seed == 0 and config.batch_size == 0
    with pytest.raises(ValueError, match="temperature"):
        ProbeConfig(temperature=0)
    with pytest.raises(ValueError, match="distinct"):
        ProbeConfig(templates=(1, 1))


def test_batch_size_and_order_do_not_change_results(tiny):
    lm, tokenizer = tiny
    facts = common_facts(12)
    one = probe_facts(lm, tokenizer, facts, QUICK, batch_size=1, progress=False)
    many = probe_facts(lm, tokenizer, facts, QUICK, batch_size=64, progress=False)
    odd = probe_facts(lm, tokenizer, facts[::-1], QUICK, batch_size=5, progress=False)
    assert len({r.level for r in one.values()}) >= 3  # the comparison is not between all-zero results
    assert one == many == odd
    assert [one[f.id].total for f in facts] == [12] * 12


def test_seed_changes_samples(tiny):
    lm, tokenizer = tiny
    prompt = tokenizer("Paris is located in")["input_ids"]
    first = generate_samples(lm, tokenizer, [prompt], [[1, 2, 3, 4]], QUICK)
    again = generate_samples(lm, tokenizer, [prompt], [[1, 2, 3, 4]], QUICK)
    other = generate_samples(lm, tokenizer, [prompt], [[5, 6, 7, 8]], QUICK)
    assert first == again and first != other
    assert len(set(first[0])) > 1  # the samples of one prompt differ from each other
    with pytest.raises(ValueError, match="exactly 4 seeds"):
        generate_samples(lm, tokenizer, [prompt], [[1, 2]], QUICK)


def test_cpu_batch_size_fits_the_memory_share(tiny, monkeypatch):
    lm, _ = tiny
    config = ProbeConfig(samples=10, max_new_tokens=32)
    per_sequence = batching._bytes_per_sequence(lm, 20, config)
    monkeypatch.setattr(batching, "_available_memory", lambda: 40 * per_sequence)
    assert batching.cpu_batch_size(lm, 20, config) == 1  # 10 sequences fit in a quarter, 20 do not
    monkeypatch.setattr(batching, "_available_memory", lambda: 1 << 40)
    assert batching.cpu_batch_size(lm, 20, config) == batching.CPU_MAX_SEQUENCES // 10


def test_two_shards_equal_one_process(tiny_model_dir, tmp_path):
    facts = common_facts(10)
    whole = run_probe(str(tiny_model_dir), facts, QUICK, tmp_path / "whole", progress=False, shard=(0, 1))
    partial = run_probe(str(tiny_model_dir), facts, QUICK, tmp_path / "sharded", progress=False, shard=(1, 2))
    assert 0 < len(partial) < len(facts)
    merged = run_probe(str(tiny_model_dir), facts, QUICK, tmp_path / "sharded", progress=False, shard=(0, 2))
    assert sorted(p.name for p in (tmp_path / "sharded").glob("records-*.jsonl")) == ["records-rank0.jsonl", "records-rank1.jsonl"]
    assert merged == whole == load_probe(tmp_path / "sharded")


def test_explicit_device_overrides_the_accelerate_device(tiny_model_dir, tmp_path, monkeypatch):
    """A study set to device "cpu" on a GPU machine probes on the CPU."""
    real_load, loaded_on = store.load_model, []

    def spy(model, dtype=None, device=None):
        loaded_on.append(device)
        return real_load(model, dtype=dtype, device=device)

    monkeypatch.setattr(store, "probe_device", lambda: "cuda:0")  # what accelerate says on a GPU machine
    monkeypatch.setattr(store, "load_model", spy)
    records = run_probe(str(tiny_model_dir), common_facts(3), QUICK, tmp_path / "store", progress=False,
                        shard=(0, 1), device="cpu")
    assert loaded_on == ["cpu"] and len(records) == 3


def test_resume_skips_finished_facts(tiny_model_dir, tmp_path, monkeypatch):
    facts = common_facts(9)
    config = ProbeConfig(samples=2, max_new_tokens=4, templates=(0, 1), batch_size=2)
    expected = run_probe(str(tiny_model_dir), facts, config, tmp_path / "full", progress=False, shard=(0, 1))
    run_probe(str(tiny_model_dir), facts[:4], config, tmp_path / "resumed", progress=False, shard=(0, 1))
    probed = []
    original = store.probe_facts
    monkeypatch.setattr(store, "probe_facts",
                        lambda lm, tok, todo, *a, **k: probed.extend(f.id for f in todo) or original(lm, tok, todo, *a, **k))
    assert run_probe(str(tiny_model_dir), facts, config, tmp_path / "resumed", progress=False, shard=(0, 1)) == expected
    assert probed == sorted(f.id for f in facts[4:])
    probed.clear()
    run_probe(str(tiny_model_dir), facts, config, tmp_path / "resumed", progress=False, shard=(0, 1))
    assert probed == []


KILL_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from assets import common_facts
from sftlens.probe import ProbeConfig, run_probe
config = ProbeConfig(samples=2, max_new_tokens=4, templates=(0, 1), batch_size=1)
run_probe({model!r}, common_facts(24), config, {store!r}, progress=False)
"""


def test_sigkill_and_restart_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    store = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), model=str(tiny_model_dir), store=str(store))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    records_file = store / "records-rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records_file.is_file() and records_file.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = records_file.read_text().count("\n")
    assert 3 <= written < 24, "the run was not interrupted midway"
    with open(records_file, "a") as f:  # a torn line, as if killed in the middle of a write
        f.write('{"fact_id": "P17/test/000')
    config = ProbeConfig(samples=2, max_new_tokens=4, templates=(0, 1), batch_size=1)
    facts = common_facts(24)
    resumed = run_probe(str(tiny_model_dir), facts, config, store, progress=False, shard=(0, 1))
    fresh = run_probe(str(tiny_model_dir), facts, config, tmp_path / "fresh", progress=False, shard=(0, 1))
    assert resumed == fresh
    assert records_file.read_text().count("\n") == 24  # finished facts were not written twice


def test_store_with_other_settings_is_an_error(tiny_model_dir, tmp_path):
    facts = common_facts(2)
    config = ProbeConfig(samples=2, max_new_tokens=3, templates=(0,))
    run_probe(str(tiny_model_dir), facts, config, tmp_path / "s", progress=False, shard=(0, 1))
    # batch size is not part of the key: results do not depend on it
    run_probe(str(tiny_model_dir), facts, ProbeConfig(samples=2, max_new_tokens=3, templates=(0,), batch_size=7),
              tmp_path / "s", progress=False, shard=(0, 1))
    with pytest.raises(SftlensError, match=r"other settings: temperature=0.7 \(now 0.9\)"):
        run_probe(str(tiny_model_dir), facts, ProbeConfig(samples=2, max_new_tokens=3, templates=(0,), temperature=0.9),
                  tmp_path / "s", progress=False, shard=(0, 1))
    with pytest.raises(SftlensError, match="other settings"):
        load_probe(tmp_path / "s", model=str(tiny_model_dir), config=ProbeConfig())


def test_bad_selection_errors(tiny_model_dir, tmp_path):
    with pytest.raises(SftlensError, match="empty fact selection"):
        run_probe(str(tiny_model_dir), [], QUICK, tmp_path / "s", progress=False)
    with pytest.raises(SftlensError, match="template index 21 out of range"):
        run_probe(str(tiny_model_dir), common_facts(1), ProbeConfig(templates=(21,)), tmp_path / "s", progress=False)
    with pytest.raises(SftlensError, match="no such probe store"):
        load_probe(tmp_path / "missing")


def test_best_templates_picks_highest_rate_per_relation():
    facts = common_facts(4, relations=("P17", "P19"))
    records = {
        facts[0].id: ProbeRecord(facts[0].id, 5, 30, (0, 3, 2)),
        facts[2].id: ProbeRecord(facts[2].id, 4, 30, (2, 0, 2)),
        facts[1].id: ProbeRecord(facts[1].id, 4, 20, (1, 3), template_ids=(4, 9)),
    }
    # P17: template 1 has 3, template 2 has 4 -> 2; P19: only templates 4 and 9 were probed -> 9
    assert best_templates(records, facts) == {"P17": 2, "P19": 9}


def test_level_counts_table_has_the_papers_layout():
    def record(fact_id, correct):
        return ProbeRecord(fact_id, correct, 8, (correct,))

    records = [record("P17/train/00001", 0), record("P19/train/00002", 2), record("P17/train/00003", 8),
               record("P17/test/00001", 1), record("P106/test/00001", 0), record("P106/test/00002", 0)]
    rows = level_counts(records)
    assert [r["set"] for r in rows] == ["D_train", "D_test", "D_testood"]
    assert [rows[0][f"level{i}"] for i in range(5)] == [1, 1, 0, 0, 1]
    assert rows[2]["level0"] == 2 and rows[2]["total"] == 2
    parsed = list(csv.DictReader(io.StringIO(level_counts_table(records, "csv"))))
    assert parsed[1] == {"set": "D_test", "level0": "0", "level1": "1", "level2": "0", "level3": "0", "level4": "0", "total": "1"}
    markdown = level_counts_table(records)
    assert markdown.splitlines()[0] == "| set | level 0 | level 1 | level 2 | level 3 | level 4 | total |"
    assert "| D_testood | 2 | 0 | 0 | 0 | 0 | 2 |" in markdown


def test_cli_probe_and_stats(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["probe", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir), "--relations", "P17,P19",
            "--split", "test", "--limit", "3", "--samples", "2", "--templates", "0,1", "--max-new-tokens", "3",
            "--store", str(store)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| D_test | " in out and out.rstrip().endswith("| 6 |")
    assert sorted(load_probe(store)) == [f"{r}/test/{i:05d}" for r in ("P17", "P19") for i in range(3)]
    assert (store / "level_counts.csv").read_text().startswith("set,level0,")
    assert main(["probe", "stats", "--store", str(store)]) == 0
    assert "| D_test | " in capsys.readouterr().out


def test_cli_bad_input_is_one_line_error(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    base = ["probe", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir), "--store", str(tmp_path / "s")]
    assert main([*base, "--relations", "P9999"]) == 2
    assert "unknown relation 'P9999'" in capsys.readouterr().err
    assert main([*base, "--relations", "P17", "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert main(["probe", "stats", "--store", str(tmp_path / "nothing")]) == 2
    assert "no such probe store" in capsys.readouterr().err


@pytest.mark.parametrize("stop_at_newline", [False, True])
def test_rows_leaving_the_batch_early_give_the_brute_force_counts(tiny, tiny_model_dir, tmp_path, monkeypatch, stop_at_newline):
    """Decided samples (their text names an answer) and finished ones (EOS, newline) leave the running
    batch; every count still equals sampling each continuation alone to its end, at batch sizes
    1, 5 and 64 and over two shards."""
    lm, tokenizer = tiny
    config = ProbeConfig(samples=4, max_new_tokens=8, temperature=1.5, templates=(0, 3), stop_at_newline=stop_at_newline)
    facts = common_facts(9)
    expected = {f.id: tuple(reference_correct(lm, tokenizer, f, t, config) for t in config.templates) for f in facts}
    assert len({sum(c) for c in expected.values()}) >= 3  # decided samples happen, and not everywhere
    seen = Counter()
    live_index, select = decoding._Batch.live_index, decoding._ReservedLayer.batch_select_indices
    monkeypatch.setattr(decoding._Batch, "live_index", lambda self: seen.update(kept=live_index(self) is not None) or live_index(self))
    monkeypatch.setattr(decoding._ReservedLayer, "batch_select_indices", lambda self, i: seen.update(dropped=1) or select(self, i))
    for batch_size in (1, 5, 64):
        records = probe_facts(lm, tokenizer, facts, config, batch_size=batch_size, progress=False)
        assert {f: r.template_correct for f, r in records.items()} == expected, batch_size
    assert seen["kept"] and seen["dropped"]  # both ways of handling an ended row ran
    sharded = {}
    for rank in (0, 1):
        sharded |= run_probe(str(tiny_model_dir), facts, config, tmp_path / "shards", progress=False, shard=(rank, 2))
    assert {f: r.template_correct for f, r in sharded.items()} == expected


def test_a_decided_sample_stops_at_its_answer(tiny):
    lm, tokenizer = tiny
    config = ProbeConfig(samples=8, max_new_tokens=12, temperature=1.5, templates=(0,))
    prompt = tokenizer("Paris is located in")["input_ids"]
    seeds = [list(range(11, 19))]
    full = generate_samples(lm, tokenizer, [prompt], seeds, config)[0]
    answer = next(a for a in COMMON_ANSWERS if any(a in t for t in full) and any(a not in t for t in full))
    early = generate_samples(lm, tokenizer, [prompt], seeds, config, answers=[(answer,)])[0]
    for whole, cut in zip(full, early):
        assert whole.startswith(cut)
        assert (answer in cut) == (answer in whole)
        if answer not in whole:
            assert cut == whole
    assert sum(len(c) for c in early) < sum(len(w) for w in full)  # some samples stopped early


def test_noise_drawn_on_threads_is_the_same_draw():
    scores = torch.randn(70, 300)
    draws = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sampler = sampling.GumbelMaxSampler(list(range(100, 170)), 0.7, torch.device("cpu"))
        with torch.inference_mode():
            draws.append(torch.stack([sampler(scores, torch.arange(70)) for _ in range(3)]))
    assert torch.equal(draws[0], draws[1])
    assert len(set(draws[0][0].tolist())) > 10  # rows draw differently


# --- question-only topics: asked as questions, not continued ----------------------------------------


def question_facts(n: int) -> list[Fact]:
    """Facts of a question-only topic (no mapping templates), as `load_fact_set` builds them."""
    topic = RelationTemplates("qa", "in", "", (QUESTION_TEMPLATE,))
    return [Fact(id=f"qa/test/q{i}", relation="qa", subject="", answers=(COMMON_ANSWERS[i % len(COMMON_ANSWERS)],),
                 split="test", domain="in", question=f"Which letter comes after number {i}?", templates=topic)
            for i in range(n)]


@pytest.fixture
def newline_first(tiny):
    """The tiny model, made to open every answer with a newline: its next token after a prompt's last
    token (the `>` of "<answer>") is always "\\n". A function of the last input token only, so decoding
    with a cache and the brute force (the whole sequence each step) see the same model."""
    lm, tokenizer = tiny
    end = encode_prompt(tokenizer, sft_prompt("Who?"))[-1]
    assert encode_prompt(tokenizer, sft_prompt("Where is it?"))[-1] == end
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    real = lm.forward

    @functools.wraps(real)
    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        last = out.logits[:, -1]
        last[:, newline] = torch.where(kwargs["input_ids"][:, -1] == end, 1e4, last[:, newline])
        return out

    lm.forward = forward
    return lm, tokenizer


def test_a_question_only_fact_is_probed_with_the_plain_qa_prompt(tiny, tmp_path):
    _, tokenizer = tiny
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"question": f"Who wrote book {i}?", "answers": ["x"], "split": "test"}) + "\n"
                            for i in range(3)))
    facts = load_fact_set(path).facts
    assert all(f.question_only for f in facts)
    for fact in facts:
        assert fact.probe_prompt(0) == sft_prompt(fact.question) == f"<question> {fact.question} <answer>"
        assert prompt_ids(tokenizer, fact, 0) == encode_prompt(tokenizer, sft_prompt(fact.question))
    templated = common_facts(1)[0]  # a mapping-template topic keeps the paper's probe prompt, in either style
    assert not templated.question_only
    assert prompt_ids(tokenizer, templated, 3, "chat") == encode_prompt(tokenizer, templated.probe_prompt(3))
    assert templated.probe_prompt(3) == templated.relation_templates().mapping_templates[3].format(subject=templated.subject)


def test_a_question_only_fact_asked_in_chat_gets_the_chat_template(tiny, monkeypatch):
    _, tokenizer = tiny
    fact = question_facts(1)[0]
    with pytest.raises(SftlensError, match="no chat template"):
        prompt_ids(tokenizer, fact, 0, "chat")
    template = "<bos>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    monkeypatch.setattr(tokenizer, "chat_template", template, raising=False)  # the tokenizer is the session's
    text = "<bos>[user] " + fact.question + "\n[assistant] "
    assert prompt_ids(tokenizer, fact, 0, "chat") == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, fact, 0, "chat").count(tokenizer.bos_token_id) == 1  # the template's own BOS only


def test_a_leading_newline_no_longer_ends_a_sample(newline_first, monkeypatch):
    """A model that opens its answer with a newline: the old rule (any newline ends a sample) left every
    sample empty and every fact at level 0; the new one ends a sample at a newline only after text."""
    lm, tokenizer = newline_first
    config = ProbeConfig(samples=4, max_new_tokens=8, temperature=1.5, stop_at_newline=True)
    facts = question_facts(8)
    prompts = [prompt_ids(tokenizer, f, 0) for f in facts]
    seeds = [[sampling.sample_seed(0, f.id, 0, j) for j in range(4)] for f in facts]
    new = generate_samples(lm, tokenizer, prompts, seeds, config)
    assert all(t.startswith("\n") for row in new for t in row)  # the model does open with a newline
    assert all(t.strip() for row in new for t in row)  # and every sample goes on past it
    assert all("\n" not in t.strip() for row in new for t in row)  # ending at its first newline after text
    assert max(r.level for r in probe_facts(lm, tokenizer, facts, config, progress=False).values()) > 0

    monkeypatch.setattr(sampling, "ended_at_newline", lambda text: "\n" in text)  # the old rule
    old = generate_samples(lm, tokenizer, prompts, seeds, config)
    assert all(t == "\n" for row in old for t in row)
    assert all(r.level == 0 for r in probe_facts(lm, tokenizer, facts, config, progress=False).values())


def test_question_only_facts_with_a_leading_newline_give_the_brute_force_counts(newline_first):
    """The brute force (tests/assets.py) decodes each sample alone under the new stop rule; the probe
    equals it on question-only facts whose every sample opens with a newline, at two batch sizes."""
    lm, tokenizer = newline_first
    config = ProbeConfig(samples=4, max_new_tokens=8, temperature=1.5, stop_at_newline=True)
    facts = question_facts(6)
    expected = {f.id: (reference_correct(lm, tokenizer, f, 0, config),) for f in facts}
    assert any(c[0] for c in expected.values())
    for batch_size in (1, 4):
        records = probe_facts(lm, tokenizer, facts, config, batch_size=batch_size, progress=False)
        assert {f: r.template_correct for f, r in records.items()} == expected, batch_size


def test_probe_table_states_each_topics_prompt(tmp_path):
    records = [ProbeRecord("P17/test/00001", 1, 4, (1,)), ProbeRecord("qa/test/q1", 0, 4, (0,))]
    topics = {"P17": load_templates()["P17"], "qa": question_facts(1)[0].templates}
    domains = {"P17": "in", "qa": "in"}
    text = write_level_tables(records, tmp_path, domains, topics, "plain")
    assert "Probe prompt: mapping templates filled in (the paper's probe): P17." in text
    assert "Probe prompt: the question in the paper's QA format (`<question> q <answer>`): qa." in text
    assert (tmp_path / "level_counts.md").read_text() == text
    assert "the model's chat template: qa." in write_level_tables(records, tmp_path, domains, topics, "chat")
    assert "plain" not in str(ProbeConfig().keyed_settings())  # the default stays out of every key
    assert ProbeConfig(question_prompt="chat").keyed_settings()["question_prompt"] == "chat"


def test_a_store_written_under_the_old_newline_rule_is_not_continued(tiny_model_dir, tmp_path):
    from sftlens.probe import run_probe

    config = ProbeConfig(samples=2, max_new_tokens=4, templates=(0,), stop_at_newline=True)
    facts = common_facts(4)
    store = tmp_path / "store"
    run_probe(str(tiny_model_dir), facts[:2], config, store, progress=False)
    meta = json.loads((store / "probe.json").read_text())
    assert meta.pop("newline_rule") == "after-text"
    (store / "probe.json").write_text(json.dumps(meta))  # as the old code wrote it
    assert set(run_probe(str(tiny_model_dir), facts[:2], config, store, progress=False)) == {f.id for f in facts[:2]}
    with pytest.raises(SftlensError, match="written when a leading newline ended a sample"):
        run_probe(str(tiny_model_dir), facts, config, store, progress=False)
