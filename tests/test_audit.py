"""The audit: transitions against a brute force from the per-fact records, base levels equal to
`sftlens probe`, the dev choice equal to a brute-force argmax, chat prompts, bad input, resume."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections import Counter

import numpy as np
import pytest

from sftlens.audit import Audit, AuditConfig, run_audit
from sftlens.audit.engine import prepare
from sftlens.audit.repairs import choose, objective
from sftlens.audit.run import plan_rows
from sftlens.audit.transitions import group_rates, mastery_matrix
from sftlens.cli import main
from sftlens.errors import SftlensError
from sftlens.evaluate import evaluate_model
from sftlens.io import read_jsonl
from sftlens.models import load_model
from sftlens.probe import ProbeConfig, load_probe
from sftlens.reporting.stats import mcnemar
from sftlens.taught import RECORD_FILE
from sftlens.weights import METHODS, repaired_models

from assets import AUDIT_ANSWERS as LETTERS
from tiny import save_model, tiny_model

PROBE = ProbeConfig(samples=2, templates=(0, 1), max_new_tokens=6)
SETTINGS = AuditConfig(answer_tokens=6, min_slice=5, bootstrap=200, dev_share=0.4)
CHAT = "{% for m in messages %}<bos>Q: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"


@pytest.fixture
def pair(audit_pair):
    return audit_pair  # conftest.py: (base, fine-tuned, data folder)


def _audit(pair, **kw) -> Audit:
    base, ft, data = pair
    return Audit(str(base), str(ft), data_dir=str(data), probe=kw.pop("probe", PROBE),
                 settings=kw.pop("settings", SETTINGS), **kw)


def test_transitions_and_choices_equal_brute_force(pair, tmp_path):
    out = tmp_path / "audit"
    summary = run_audit(_audit(pair), out, progress=False)
    rows = read_jsonl(out / "facts.jsonl")
    assert len(rows) == summary["facts"] == 24 * 3
    # every cell of the mastery matrix and of the greedy transitions, from the per-fact rows
    cells = Counter((r["base_level"], r["finetuned_level"]) for r in rows)
    assert summary["matrix"] == [[cells[b, f] for f in range(5)] for b in range(5)]
    moves = Counter(r["transition"] for r in rows)
    assert moves["kept"] and moves["forgotten"] and moves["learned"] and moves["never"], moves
    for level, group in summary["by_level"]:
        mine = [r for r in rows if r["base_level"] == int(level)]
        for name, (b, f) in {"kept": (1, 1), "forgotten": (1, 0), "learned": (0, 1), "never": (0, 0)}.items():
            assert group[name] == sum(r["base_correct"] == b and r["finetuned_correct"] == f for r in mine)
    right = [r for r in rows if r["base_correct"]]
    assert summary["all"]["forgotten_rate"]["value"] == pytest.approx(
        sum(not r["finetuned_correct"] for r in right) / len(right))
    for relation, group in summary["by_relation"]:
        assert group["n"] == sum(r["relation"] == relation for r in rows)
    # the dev choice of every method is the brute-force argmax over every dev fact answered by every
    # candidate (the slow path: the audit answers only the forgotten and learned ones; ties: least edit)
    dev = [r for r in rows if r["slice"] == "dev"]
    moved = {r["fact_id"] for r in dev if r["transition"] in ("forgotten", "learned")}
    assert moved and len(moved) < len(dev)
    ctx = prepare(_audit(pair), out, progress=False)
    model, tokenizer = load_model(ctx.folders["finetuned"])
    dev_rows = [r for r in ctx.rows("finetuned") if ctx.slice_of[r["fact_id"]] == "dev"]
    assert set(summary["repairs"]) == set(METHODS)
    for method, result in summary["repairs"].items():
        scores = {}
        for value, edited in repaired_models(model, ctx.folders["base"], ctx.folders["finetuned"],
                                             result["candidates"], ctx.repair_config(method), progress=False):
            right = {p["fact_id"]: p["correct"] for p in evaluate_model(edited, tokenizer, dev_rows,
                                                                         ctx.eval_config(), progress=False)}
            recovered = sum(r["transition"] == "forgotten" and right[r["fact_id"]] for r in dev)
            lost = sum(r["transition"] == "learned" and not right[r["fact_id"]] for r in dev)
            scores[value] = (recovered - lost) / len(dev)
            record = json.loads((out / "repairs" / "dev" / f"{method}-{value:g}.json").read_text())
            assert record["correct"] == {i: right[i] for i in moved}
        best = max(scores.values())
        ties = [v for v in scores if scores[v] == best]
        assert result["chosen"] == min(ties, key=lambda v: (abs(v - METHODS[method].neutral), v))
        assert result["dev_scores"] == {f"{v:g}": s for v, s in scores.items()}
    # exact McNemar p-values: base against fine-tune per group, each repair against the fine-tune on test
    assert summary["all"]["mcnemar_p"] == mcnemar(moves["forgotten"], moves["learned"])
    test = [r for r in rows if r["slice"] == "test"]
    test_moves = Counter(r["transition"] for r in test)
    assert summary["reference_mcnemar_p"]["base"] == mcnemar(test_moves["forgotten"], test_moves["learned"])
    for method, result in summary["repairs"].items():
        record = json.loads((out / "repairs" / "test" / f"{method}-{result['chosen']:g}.json").read_text())
        lost = sum(r["finetuned_correct"] and not record["correct"][r["fact_id"]] for r in test)
        gained = sum(not r["finetuned_correct"] and record["correct"][r["fact_id"]] for r in test)
        assert result["test"]["mcnemar_p"] == mcnemar(lost, gained)
    assert json.loads((out / "summary.json").read_text())["repairs"]["wise"]["test"]["mcnemar_p"] is not None
    report = (out / "report" / "report.html").read_text()
    assert '<td class="num">' in report and "<td>wise</td>" in report
    assert "McNemar p vs fine-tuned" in report and "Probe prompt: mapping templates filled in" in report
    # the plan counts the answers and edits the repairs make: with their outputs gone, exactly a re-run's
    shutil.rmtree(out / "repairs")
    plan = {step: (work, unit) for step, work, unit, _ in plan_rows(ctx)}
    values = sum(len(r["candidates"]) for r in summary["repairs"].values())
    assert plan["repairs on dev"] == (values * len(moved), f"answers ({values} edits)")
    assert plan["repairs on test"] == (len(METHODS) * len(test), f"answers ({len(METHODS)} edits)")
    assert plan["fact importances (guided)"][0] == 0  # its file is still there


def test_synthetic_rates_and_objectives_equal_brute_force():
    rng = random.Random(3)
    rows = [{"fact_id": f"P17/test/{i:05d}", "domain": rng.choice("io") + "n"[:1], "base_level": rng.randrange(5),
             "finetuned_level": rng.randrange(5), "base_correct": rng.random() < 0.5,
             "finetuned_correct": rng.random() < 0.5} for i in range(200)]
    matrix = mastery_matrix(rows)
    assert sum(map(sum, matrix)) == 200
    assert matrix[2][3] == sum(r["base_level"] == 2 and r["finetuned_level"] == 3 for r in rows)
    rates = group_rates(rows, 500, 0)
    wrong = [r for r in rows if not r["base_correct"]]
    learned = sum(r["finetuned_correct"] for r in wrong) / len(wrong)
    assert rates["learned_rate"].value == pytest.approx(learned)
    assert rates["learned_rate"].low < learned < rates["learned_rate"].high
    repaired = {r["fact_id"]: rng.random() < 0.5 for r in rows}
    want = (sum(r["base_correct"] and not r["finetuned_correct"] and repaired[r["fact_id"]] for r in rows)
            - sum(r["finetuned_correct"] and not r["base_correct"] and not repaired[r["fact_id"]] for r in rows)) / 200
    assert objective(rows, repaired, "recovered") == pytest.approx(want)
    by_cell: dict = {}
    for r in rows:
        by_cell.setdefault((r["domain"], r["base_level"]), []).append(repaired[r["fact_id"]])
    domains = sorted({d for d, _ in by_cell})
    acc = np.mean([np.mean([np.mean(v) for (d, _), v in by_cell.items() if d == dom]) for dom in domains])
    assert objective(rows, repaired, "acc") == pytest.approx(acc)
    assert choose({0.5: 0.1, 0.75: 0.1, 0.25: 0.0}, "wise") == 0.75  # a tie goes to the least edit
    assert choose({1.0: 0.2, 5.0: 0.2}, "restore") == 1.0


def test_base_levels_equal_sftlens_probe(pair, tmp_path, capsys):
    base, ft, data = pair
    out = tmp_path / "audit"
    flags = ["--data-dir", str(data), "--split", "test", "--limit", "3", "--samples", "2", "--templates", "0,1",
             "--max-new-tokens", "6"]
    focus = tmp_path / "taught.txt"
    focus.write_text("P17/test/00000\nP17/test/00001\nP19/test/00002\n")
    page = tmp_path / "page.md"
    assert main(["audit", "--base", str(base), "--finetuned", str(ft), "--out", str(out), *flags,
                 "--answer-tokens", "6", "--min-slice", "5", "--bootstrap", "100", "--write-best",
                 "--focus-facts", str(focus), "--page", str(page)]) == 0
    chosen = json.loads((out / "best" / "chosen.json").read_text())
    assert (out / "best" / chosen["folder"] / "config.json").is_file() and chosen["method"] in METHODS
    text = page.read_text()
    assert "Recall of forgotten taught facts" in text and "3 of the 3 listed" in text
    assert "Audit run: `sftlens audit" in text and "Machine:" in text
    capsys.readouterr()
    assert main(["audit", "--out", str(out), "--plan"]) == 0  # the recorded audit: nothing left to run
    plan = capsys.readouterr().out
    assert "| **all** |  |  | 0.0 min |" in plan, plan
    assert main(["probe", "--model", str(base), "--store", str(tmp_path / "store"), *flags]) == 0
    probed = load_probe(tmp_path / "store")
    rows = read_jsonl(out / "facts.jsonl")
    assert {r["fact_id"]: r["base_level"] for r in rows} == {i: rec.level for i, rec in probed.items()}
    assert load_probe(next((out / "probe").glob("base-*"))) == probed
    assert any(r["base_level"] > 0 for r in rows)


def test_the_cli_says_a_line_per_step_with_one_bar_each_and_nothing_but_results_with_quiet(pair, tmp_path, capfd):
    base, ft, data = pair
    flags = ["--base", str(base), "--finetuned", str(ft), "--data-dir", str(data), "--limit", "2", "--samples", "2",
             "--templates", "0,1", "--max-new-tokens", "6", "--answer-tokens", "6", "--min-slice", "5",
             "--bootstrap", "50"]
    capfd.readouterr()
    assert main(["audit", *flags, "--out", str(tmp_path / "loud")]) == 0
    out, err = capfd.readouterr()
    summary = json.loads((tmp_path / "loud" / "summary.json").read_text())
    steps = ["probe base: 48 facts, levels 0-4: ", "probe finetuned: ", "greedy base: ", "greedy finetuned: ",
             "first-token KL: mean ", "update concentration: the top 1 % ", *(f"repair {m}: " for m in summary["repairs"])]
    assert all(f"\n{line}" in out for line in steps), out
    assert "Loading weights" not in err and "Writing model shards" not in err
    # one bar per step: the greedy answers' two, no weight pass's, none per repair value
    assert len(re.findall(r"evaluate:\s+0%", err)) == 2 and "key histogram" not in err and "summaries" not in err
    assert len(re.findall(r"repair wise on dev:\s+0%", err)) == 1
    assert main(["--quiet", "audit", *flags, "--out", str(tmp_path / "quiet")]) == 0
    out, err = capfd.readouterr()
    a = summary["all"]
    assert out.splitlines()[0] == f"48 facts: {a['kept']} kept, {a['forgotten']} forgotten, {a['learned']} learned, " \
                                  f"{a['never']} never right"
    assert str(tmp_path / "quiet" / "report" / "report.html") in out and "probe base" not in out and "| step |" not in out
    assert not [mark for mark in ("█", "%|", "\r", "it/s") if mark in err], err


def test_chat_prompts_use_each_models_template(pair, tmp_path):
    base, ft, data = pair
    with pytest.raises(SftlensError, match="no chat template"):
        run_audit(_audit(pair, settings=AuditConfig(prompt="chat", min_slice=5)), tmp_path / "nochat", progress=False)
    assert not (tmp_path / "nochat").exists()
    for folder in (base, ft):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    out = tmp_path / "chat"
    run_audit(_audit(pair, limit=1, settings=AuditConfig(prompt="chat", min_slice=5, answer_tokens=4, bootstrap=50,
                                                      dev_share=0.4)), out, progress=False)
    rows = read_jsonl(out / "facts.jsonl")
    assert all(r["base_prompt"] == f"<bos>Q: {r['question']} A:" for r in rows)
    from sftlens.audit.prompts import Templated
    from sftlens.data import encode_prompt
    from sftlens.models import load_tokenizer

    tok = load_tokenizer(str(base))
    ids = encode_prompt(Templated(tok), rows[0]["base_prompt"])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def _fails(pair, tmp_path, match, **kw):
    out = tmp_path / "bad"
    with pytest.raises(SftlensError, match=match):
        run_audit(_audit(pair, **kw), out, progress=False)
    assert not out.exists()


def test_bad_input_is_one_line_and_writes_nothing(pair, tmp_path, tiny_tokenizer):
    base, ft, data = pair
    _fails(pair, tmp_path, "too few facts", limit=1, settings=AuditConfig(min_slice=20))
    _fails((base, base, data), tmp_path, "identical to its base")
    _fails((base, tmp_path / "nowhere" / "x", data), tmp_path, "nowhere")
    wide, _ = tiny_model(seed=0, hidden_size=64, tokenizer=tiny_tokenizer)
    _fails((base, save_model(wide, tiny_tokenizer, tmp_path / "wide"), data), tmp_path, "shape")
    from transformers import MistralConfig, MistralForCausalLM
    other = MistralForCausalLM(MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    _fails((base, save_model(other, tiny_tokenizer, tmp_path / "mistral"), data), tmp_path, "different architectures")
    from tiny import tiny_tokenizer as make_tokenizer
    retok = make_tokenizer(["completely different corpus of words", "for another vocabulary"], vocab_size=300)
    model, _ = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    _fails((base, save_model(model, retok, tmp_path / "retok"), data), tmp_path, "different tokenizers")
    assert main(["audit", "--base", str(base), "--finetuned", str(base), "--out", str(tmp_path / "cli"),
                 "--data-dir", str(data)]) == 2
    assert not (tmp_path / "cli").exists()


def test_resume_after_a_kill_ends_identical(pair, tmp_path, monkeypatch):
    import sftlens.audit.engine as engine

    audit = _audit(pair, values=(("wise", (0.3, 0.6, 0.9)),))
    whole = tmp_path / "whole"
    run_audit(audit, whole, progress=False)
    real = engine.repaired_models
    swept = []

    def recording(kill_at=None):
        def sweep(model, base, ft, values, config, progress=True):
            for value, edited in real(model, base, ft, values, config, progress):
                if (config.method, value) == kill_at:
                    raise KeyboardInterrupt  # a kill in the middle of a sweep
                swept.append((config.method, value))
                yield value, edited
        return sweep

    killed = tmp_path / "killed"
    dare = engine.rp.candidates("dare", SETTINGS.candidates)
    monkeypatch.setattr(engine, "repaired_models", recording(kill_at=("dare", dare[1])))
    with pytest.raises(KeyboardInterrupt):
        run_audit(audit, killed, progress=False)
    assert (killed / "facts.jsonl").is_file() and not (killed / "summary.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (killed / "steps").glob("*.json")}
    assert len(stamps) == 4  # greedy x 2, kl, deltas
    swept.clear()
    monkeypatch.setattr(engine, "repaired_models", recording())
    run_audit(audit, killed, progress=False)
    # restore and wise finished before the kill, and DARE's first value: only the rest is redone
    assert swept[:2] == [("dare", dare[1]), ("dare", dare[2])]
    assert not [m for m, _ in swept if m in ("restore", "wise")] and ("trim", 80.0) in swept
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished steps skipped
    for name in ("facts.jsonl", "summary.json"):
        assert (killed / name).read_text() == (whole / name).read_text()
    assert json.loads((whole / "summary.json").read_text())["repairs"]["wise"]["candidates"] == [0.3, 0.6, 0.9]


def test_every_html_report_aligns_text_left_and_numbers_right():
    from sftlens.reporting.page import Section, _html, numeric_columns

    rows = [["C1", "12.3 ± 0.4", "+1.2 [-0.3, +2.5] holds", "–", 30], ["level 0", "–", "−1.0 [−2, −0.5]", "x", 7]]
    assert numeric_columns(rows, 6) == [False, True, True, False, True, False]
    page = _html("t", [Section("s", "", [("", ["claim", "Acc", "gain", "note", "n", "empty"], rows)])])
    assert "<th>claim</th>" in page and '<th class="num">Acc</th>' in page and '<td class="num">30</td>' in page
    assert "<td>level 0</td>" in page and "text-align:left" in page and ".num{text-align:right}" in page


def test_preset_and_command_line_make_one_audit(tmp_path):
    import argparse

    from sftlens.audit.run import add_cli, audit_from_args

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["audit", "--preset", "audit-demo", "--base", "a", "--finetuned", "b", "--out",
                              str(tmp_path), "--samples", "3", "--values", "wise=0.2,0.4,0.6"])
    audit = audit_from_args(args)
    assert (audit.limit, audit.split, audit.probe.templates, audit.probe.samples) == (3, "test", (0, 1), 3)
    assert audit.settings.answer_tokens == 8 and audit.values == (("wise", ("0.2", "0.4", "0.6")),)
    assert Audit.from_dict(json.loads(json.dumps(audit.to_dict())), "x").to_dict() == audit.to_dict()
    with pytest.raises(SftlensError, match="unknown audit preset"):
        audit_from_args(parser.parse_args(["audit", "--preset", "nope", "--base", "a", "--finetuned", "b",
                                           "--out", str(tmp_path)]))


@pytest.mark.slow
def test_smollm2_chat_prompt_is_its_template_with_one_start_token(smollm2_dir):
    from sftlens.audit.prompts import Templated, question_prompt
    from sftlens.data import encode_prompt
    from sftlens.models import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    prompt = question_prompt(tok, "Where is Paris located?", "chat")
    assert prompt.endswith("<|im_start|>assistant\n") and "Where is Paris located?<|im_end|>" in prompt
    ids = encode_prompt(Templated(tok), prompt)
    assert ids == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[:1]) == "<|im_start|>" and tok.decode(ids) == prompt


def test_an_audit_reads_a_fact_set_with_its_own_templates_and_aliases(pair, tmp_path):
    """`--facts`: a native JSONL set (one topic with mapping templates, one question-only topic) is
    probed with its own templates, and an answer's aliases travel with the fact."""
    base, ft, _ = pair
    facts = tmp_path / "mine.jsonl"
    rows = [{"subject": f"Item {i}", "relation": "colour", "id": f"c{i}", "split": "test",
             "answers": [{"answer": LETTERS[i % 8], "aliases": [LETTERS[(i + 1) % 8]]}]} for i in range(12)]
    rows += [{"question": f"Which letter is number {i}?", "relation": "letter", "id": f"l{i}", "split": "test",
              "answers": [LETTERS[(2 * i) % 8]]} for i in range(12)]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mine.relations.json").write_text(json.dumps({"relations": {"colour": {
        "question": "What colour is {subject}?", "templates": ["{subject} is coloured", "The colour of {subject} is"]}}}))
    probe = ProbeConfig(samples=2, templates=(0,), max_new_tokens=6)  # a question-only topic has one template
    audit = Audit(str(base), str(ft), facts=str(facts), probe=probe, settings=SETTINGS)
    summary = run_audit(audit, tmp_path / "audit", progress=False)
    written = {r["fact_id"]: r for r in read_jsonl(tmp_path / "audit" / "facts.jsonl")}
    assert summary["facts"] == len(written) == 24
    assert {i.split("/")[0] for i in written} == {"colour", "letter"}
    colour = next(r for i, r in written.items() if i.startswith("colour/"))
    assert len(colour["answers"]) == 2  # the answer and its alias
    kl = json.loads((tmp_path / "audit" / "steps" / "kl.json").read_text())
    assert kl["summary"]["n"] == 24
    # the question-only topic was asked its question in the audit's (plain) QA format, and the report says so
    assert summary["probe_prompts"]["letter"].startswith("the question in the paper's QA format")
    assert summary["probe_prompts"]["colour"].startswith("mapping templates")
    assert "Probe prompt: the question in the paper's QA format (`<question> q <answer>`): letter." in \
        (tmp_path / "audit" / "report" / "report.md").read_text()


def test_a_chat_audit_probes_question_only_topics_in_each_models_chat_template(pair, tmp_path, capsys):
    """A question-only topic is probed as the audit asks (here each model's chat template): both stores
    say so, and their records equal `sftlens probe --question-prompt chat`'s."""
    base, ft, _ = pair
    for folder in (base, ft):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    facts = tmp_path / "qa.jsonl"
    facts.write_text("".join(json.dumps({"question": f"Which letter is number {i}?", "id": f"l{i}", "split": "test",
                                         "answers": [LETTERS[i % 8]]}) + "\n" for i in range(16)))
    probe = ProbeConfig(samples=2, templates=(0,), max_new_tokens=6)
    settings = AuditConfig(prompt="chat", min_slice=5, answer_tokens=4, bootstrap=50, dev_share=0.4)
    summary = run_audit(Audit(str(base), str(ft), facts=str(facts), probe=probe, settings=settings),
                        tmp_path / "audit", progress=False)
    assert summary["probe_prompts"] == {"facts": "the question in the model's chat template"}
    stores = {p.name.split("-")[0]: p for p in (tmp_path / "audit" / "probe").iterdir()}
    assert {r: json.loads((p / "probe.json").read_text())["settings"]["question_prompt"] for r, p in stores.items()} \
        == {"base": "chat", "finetuned": "chat"}
    assert main(["probe", "--model", str(base), "--facts", str(facts), "--split", "test", "--samples", "2",
                 "--templates", "0", "--max-new-tokens", "6", "--question-prompt", "chat",
                 "--store", str(tmp_path / "store")]) == 0
    assert load_probe(tmp_path / "store") == load_probe(stores["base"])
    assert "the question in the model's chat template: facts." in (tmp_path / "store" / "level_counts.md").read_text()
    capsys.readouterr()
    assert main(["probe", "stats", "--store", str(tmp_path / "store"), "--facts", str(facts)]) == 0  # style from the store
    assert "the question in the model's chat template: facts." in capsys.readouterr().out


def test_an_injected_base_and_its_fine_tune_are_probed_on_the_same_held_out_templates(pair, tmp_path):
    """The fine-tune carries no inject record: it takes its base's held-out templates, never a taught one."""
    base, _, _ = pair
    (base / RECORD_FILE).write_text(json.dumps({"templates": list(range(19)), "facts": []}))
    run_audit(_audit(pair, probe=ProbeConfig(samples=2, max_new_tokens=6)), tmp_path / "audit", progress=False)
    stores = {p.name.split("-")[0]: json.loads((p / "probe.json").read_text())["settings"]["templates"]
              for p in (tmp_path / "audit" / "probe").iterdir()}
    assert stores == {"base": [19, 20], "finetuned": [19, 20]}


def test_a_kl_step_killed_mid_way_resumes_its_finished_chunks_and_ends_identical(pair, tmp_path, monkeypatch):
    import sftlens.audit.engine as engine

    monkeypatch.setattr(engine, "KL_CHUNK", 16)  # 72 facts: five chunks
    whole = tmp_path / "whole"
    run_audit(_audit(pair), whole, progress=False)
    real, chunks = engine.first_token_kl, []

    def killed_after(n):
        def kl(ft, base, tokenizer, pairs, top_k):
            if len(chunks) == n:
                raise KeyboardInterrupt
            chunks.append(list(pairs))
            return real(ft, base, tokenizer, pairs, top_k)
        return kl

    killed = tmp_path / "killed"
    monkeypatch.setattr(engine, "first_token_kl", killed_after(2))
    with pytest.raises(KeyboardInterrupt):
        run_audit(_audit(pair), killed, progress=False)
    assert not (killed / "steps" / "kl.json").exists() and len(read_jsonl(next((killed / "steps").glob(".kl.*")))) == 32
    done = [pair for chunk in chunks for pair in chunk]
    chunks.clear()
    monkeypatch.setattr(engine, "first_token_kl", killed_after(10**6))
    run_audit(_audit(pair), killed, progress=False)
    # only the three unfinished chunks were computed again, each as the uninterrupted run batches it
    assert [len(c) for c in chunks] == [16, 16, 8] and not set(map(tuple, done)) & {p for c in chunks for p in c}
    assert not list((killed / "steps").glob(".kl.*"))
    for name in ("steps/kl.json", "facts.jsonl", "summary.json"):
        assert (killed / name).read_text() == (whole / name).read_text(), name


def test_before_the_greedy_answers_the_plan_estimates_the_dev_facts_read(pair, tmp_path):
    """Nothing run yet: the dev facts whose correctness moves are unknown, so the plan takes READ_SHARE of the
    dev facts (recovered) or all of them (acc) for every candidate; test: each method's one value on every test fact."""
    from sftlens.audit.run import READ_SHARE

    for name in ("recovered", "acc"):
        audit = _audit(pair, settings=dataclasses.replace(SETTINGS, objective=name))
        ctx = prepare(audit, tmp_path / name, progress=False)
        plan = {step: (work, unit) for step, work, unit, _ in plan_rows(ctx)}
        dev = sum(v == "dev" for v in ctx.slice_of.values())
        read = dev if name == "acc" else round(READ_SHARE * dev)
        values = sum(map(len, ctx.values.values()))
        assert plan["repairs on dev"] == (values * read, f"answers ({values} edits)"), name
        assert plan["repairs on test"] == (len(METHODS) * (len(ctx.facts) - dev), f"answers ({len(METHODS)} edits)")
        assert plan["first-token KL"][0] == 2 * len(ctx.facts) and not (tmp_path / name).exists()
