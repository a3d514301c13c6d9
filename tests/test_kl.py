"""First-token KL: the re-normalised top-k KL, prompts per style, the cached file level and the figure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sftlens.analysis.kl import (
    KLConfig,
    compute_kl,
    first_token_kl,
    first_token_logits,
    kl_for_models,
    kl_prompts,
    summarize_kl,
    top_k_kl,
)
from sftlens.data import encode_prompt, load_templates, sft_prompt
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_jsonl

from tiny import save_model, tiny_model


def test_top_k_kl_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    ft, base = torch.randn(3, 40, generator=gen), torch.randn(3, 40, generator=gen)
    got = top_k_kl(ft, base, 10)
    for row in range(3):
        ids = sorted(range(40), key=lambda i: -ft[row, i].item())[:10]
        p = [math.exp(ft[row, i].item()) for i in ids]
        q = [math.exp(base[row, i].item()) for i in ids]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        assert got[row].item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(top_k_kl(ft, ft + 3.0, 10), torch.zeros(3), atol=1e-6), "shifts cancel in softmax"
    with pytest.raises(SftlensError, match="vocabularies differ"):
        top_k_kl(ft, base[:, :30], 10)


def _prompts():
    return [sft_prompt(q) for q in ("Where is Paris?", "Which country is Rome located in?", "Who?")]


def test_first_token_logits_do_not_depend_on_batching(tiny):
    model, tok = tiny
    prompts = _prompts()
    batched = first_token_logits(model, tok, prompts, batch_size=3)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([encode_prompt(tok, p)])).logits[0, -1]
            assert torch.allclose(batched[i], alone, atol=1e-5)


def test_first_token_kl_zero_for_same_model_positive_otherwise(tiny, tiny_tokenizer):
    model, tok = tiny
    other, _ = tiny_model(seed=1, tokenizer=tiny_tokenizer)
    prompts = _prompts()
    assert first_token_kl(model, model, tok, prompts) == pytest.approx([0.0] * 3, abs=1e-6)
    values = first_token_kl(model, other, tok, prompts, top_k=5, batch_size=2)
    assert len(values) == 3 and all(v > 0 for v in values)
    pairs = [(p, "<question> Who? <answer>") for p in prompts]
    assert first_token_kl(model, model, tok, pairs)[2] == pytest.approx(0.0, abs=1e-6)
    assert first_token_kl(model, model, tok, pairs)[0] > 0


def test_first_token_kl_in_chunks_equals_the_kl_of_all_logits_at_once(tiny, tiny_tokenizer, monkeypatch):
    from sftlens.analysis import kl

    model, tok = tiny
    other, _ = tiny_model(seed=1, tokenizer=tiny_tokenizer)
    prompts = _prompts() * 3
    whole = top_k_kl(first_token_logits(model, tok, prompts), first_token_logits(other, tok, prompts), 10)
    monkeypatch.setattr(kl, "KL_CHUNK", 2)
    assert first_token_kl(model, other, tok, prompts) == pytest.approx(whole.tolist(), abs=1e-6)


def _rows(n: int = 4) -> list[dict]:
    rows = []
    for i, relation in enumerate(["P17", "P19", "P17", "P131"][:n]):
        subject = f"Entity {i}"
        question = load_templates()[relation].question.format(subject=subject)
        rows.append({"fact_id": f"{relation}/test/{i:05d}", "relation": relation, "domain": "in", "level": 4,
                     "question": question, "answers": ["France"], "prompt": sft_prompt(question),
                     "completion": " France "})
    return rows


def test_prompt_styles_fill_the_chosen_template():
    rows = _rows(2)
    templates = load_templates()
    mapped = templates["P17"].mapping_templates[2].format(subject="Entity 0")
    pairs = kl_prompts(rows, "template", {"P17": 2})
    assert pairs[0] == (mapped, mapped)
    assert pairs[1][0] == templates["P19"].mapping_templates[0].format(subject="Entity 1")
    assert kl_prompts(rows, "mixed", {"P17": 2})[0] == (rows[0]["prompt"], mapped)
    assert kl_prompts(rows, "sft", {})[0] == (rows[0]["prompt"], rows[0]["prompt"])
    with pytest.raises(SftlensError, match="does not fit"):
        kl_prompts([{**rows[0], "question": "nonsense"}], "sft", {})


def test_answer_filter_keeps_facts_whose_base_completion_has_the_answer(tiny, monkeypatch):
    import sftlens.analysis.kl

    model, tok = tiny
    rows = _rows(4)
    outputs = iter([["France is", "Spain"], ["no", "france!"]])
    monkeypatch.setattr(sftlens.analysis.kl, "generate_answers", lambda *a, **k: next(outputs))
    result = kl_for_models(model, model, tok, rows, KLConfig(answer_within=4, batch_size=2), {})
    assert [f["fact_id"] for f in result["facts"]] == [rows[0]["fact_id"], rows[3]["fact_id"]]


def test_compute_kl_writes_and_reuses_results(tmp_path, tiny_tokenizer, monkeypatch):
    base, tok = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    ft, _ = tiny_model(seed=2, tokenizer=tiny_tokenizer)
    base_dir, ft_dir = save_model(base, tok, tmp_path / "base"), save_model(ft, tok, tmp_path / "ft")
    test = tmp_path / "in-level4.jsonl"
    atomic_write_jsonl(test, _rows())
    result = compute_kl(str(base_dir), str(ft_dir), test, KLConfig(), {"P17": 1}, tmp_path / "out")
    assert result["summary"]["n"] == 4 and result["summary"]["mean"] > 0
    prompts = [p[0] for p in kl_prompts(_rows(), "template", {"P17": 1})]
    want = first_token_kl(ft, base, tok, prompts)
    assert [f["kl"] for f in result["facts"]] == pytest.approx(want, rel=1e-4)

    import sftlens.analysis.kl

    monkeypatch.setattr(sftlens.analysis.kl, "load_model", lambda *a, **k: pytest.fail("should reuse kl.json"))
    again = compute_kl(str(base_dir), str(ft_dir), test, KLConfig(batch_size=3), {"P17": 1}, tmp_path / "out")
    assert again == json.loads((tmp_path / "out" / "kl.json").read_text())


def test_summary():
    s = summarize_kl([1.0, 2.0, 3.0, 10.0])
    assert (s["n"], s["mean"], s["median"], s["min"], s["max"]) == (4, 4.0, 2.5, 1.0, 10.0)
    assert summarize_kl([]) == {"n": 0}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        KLConfig(top_k=1)


def test_kl_prompts_take_a_fact_sets_own_templates():
    """A fact set's topic with a mapping template fills it with the subject read back from its question
    template; a question-only topic's one template is the question itself."""
    from sftlens.data.facts import RelationTemplates

    relations = {"capital": RelationTemplates("capital", "in", "What is the capital of {subject}?",
                                              ("The capital of {subject} is",)),
                 "colour": RelationTemplates("colour", "in", "", ("{question}",))}
    rows = [{"fact_id": "capital/test/a", "relation": "capital", "question": "What is the capital of Spain?"},
            {"fact_id": "colour/test/b", "relation": "colour", "question": "What colour is snow?"}]
    assert kl_prompts(rows, "template", {}, relations) == [("The capital of Spain is", "The capital of Spain is"),
                                                          ("What colour is snow?", "What colour is snow?")]
    with pytest.raises(SftlensError, match="unknown relation 'capital'"):
        kl_prompts(rows, "template", {})  # the paper's relations do not know the set's topics
