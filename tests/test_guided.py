"""The guided repair: importances against an autograd brute force, the selection against a brute-force
sort of the score, the neutral value, the audit's choice against a brute-force argmax over dev records,
bad input, and no test fact leaking into the importances."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sftlens.audit import Audit, AuditConfig, engine, importances, run_audit
from sftlens.audit.repairs import choose
from sftlens.cli import main
from sftlens.data import load_templates, sft_prompt
from sftlens.errors import SftlensError
from sftlens.io import read_jsonl
from sftlens.models import model_fingerprint
from sftlens.probe import ProbeConfig
from sftlens.weights import METHODS, RepairConfig, open_pair, repair_sweep, select
from sftlens.weights.apply import apply_in_memory
from sftlens.weights.checkpoints import in_region
from sftlens.weights.guided import Importances, fisher_diagonals, score_source, write_importances
from sftlens.weights.selection import SelectionConfig, target_count

from assets import load_folder, random_pair
from tiny import save_model, tiny_model

FACTS = {"forgotten": [(sft_prompt("Which country is Paris in?"), "France"),
                       (sft_prompt("Which country is Berlin in?"), "Germany"),
                       (sft_prompt("Where was Entity P19 born?"), "United States of America")],
         "learned": [(sft_prompt("Which country is Rome in?"), "Italy"),
                     (sft_prompt("Which country is Tokyo in?"), "Japan")]}
KS = (1, 5, 20, 50, 100)


def brute_force_fisher(model, tokenizer, facts) -> dict[str, dict[str, torch.Tensor]]:
    """Per fact: log p(answer | prompt) from the model's own labelled loss (mean over the answer's tokens,
    times their number), its gradient by `torch.autograd.grad`, squared; summed over the facts."""
    params = dict(model.named_parameters())
    out = {}
    for kind, pairs in facts.items():
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for prompt, answer in pairs:
            prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + answer_ids])
            labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
            log_p = -model(input_ids=ids, labels=labels).loss * len(answer_ids)
            grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    total[name] += grad.double().square().float()
        out[kind] = total
    return out


def _fine_tuned_fishers(tiny_pair, tokenizer):
    """(the fine-tuned tiny model, its checkpoint's tensor names, FACTS' importances on it, their counts)."""
    base_dir, ft_dir, ft_state = tiny_pair
    model = tiny_model(seed=0, tokenizer=tokenizer)[0]
    model.load_state_dict(ft_state)
    names = open_pair(base_dir, ft_dir).region_names("all")
    return model, names, *fisher_diagonals(model, tokenizer, FACTS, names, progress=False)


def test_importances_equal_an_autograd_brute_force(tiny_pair, tiny_tokenizer, tmp_path, private_cache):
    base_dir, ft_dir, ft_state = tiny_pair
    model, names, fishers, counts = _fine_tuned_fishers(tiny_pair, tiny_tokenizer)
    assert counts == {"forgotten": 3, "learned": 2}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the model is left as it was
    want = brute_force_fisher(model, tiny_tokenizer, FACTS)
    for kind in FACTS:
        assert set(fishers[kind]) == set(names)
        for name in names:
            got, ref = fishers[kind][name], want[kind][name]
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-10 * float(ref.abs().max())), (kind, name)
        assert any(bool(fishers[kind][n].gt(0).any()) for n in names)
    # the file holds them exactly, with the sums eps is made of
    path = write_importances(tmp_path / "imp.safetensors", fishers, counts, "key-1", model_fingerprint(str(ft_dir)))
    stored = Importances.open(path)
    assert (stored.key, stored.counts) == ("key-1", counts)
    name = names[3]
    assert torch.equal(stored.read("learned", name, (1, 3)), fishers["learned"][name][1:3])
    assert stored.sums[name][0] == float(fishers["forgotten"][name].double().sum())


def test_a_tied_head_and_embedding_each_get_their_one_gradient_whole(tiny_tokenizer, private_cache):
    """Tied input and output embeddings are one parameter with two checkpoint names: its gradient (both uses
    summed) is squared once per fact and given to each name; a stale gradient the caller left is not counted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlens.weights.checkpoints import tensors_by_checkpoint_name

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    names = sorted(tensors_by_checkpoint_name(model, keep_vars=True))
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(names)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # left over by the caller
    fishers, _ = fisher_diagonals(model, tiny_tokenizer, FACTS, names, progress=False)
    want = brute_force_fisher(model, tiny_tokenizer, FACTS)
    for kind in FACTS:
        ref = want[kind]["model.embed_tokens.weight"]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.allclose(fishers[kind][name], ref, rtol=1e-4, atol=1e-10 * float(ref.abs().max())), name


def _write_synthetic(path: Path, base: dict, ft_dir: Path, ties: bool, seed: int = 5) -> dict:
    """Importances of every tensor, with zeros (and, with `ties`, few distinct values)."""
    gen = torch.Generator().manual_seed(seed)
    fishers = {}
    for kind in ("forgotten", "learned"):
        fishers[kind] = {}
        for name, t in base.items():
            values = torch.randint(0, 3, t.shape, generator=gen).float() if ties else \
                torch.rand(t.shape, generator=gen) ** 4 * (torch.rand(t.shape, generator=gen) > 0.2)
            fishers[kind][name] = values
    write_importances(path, fishers, {"forgotten": 3, "learned": 2}, f"synthetic-{ties}",
                      model_fingerprint(str(ft_dir)))
    return fishers


def brute_force_guided(base, ft, fishers, counts, ks, region="body") -> dict[float, dict[str, torch.Tensor]]:
    """The module doc's score over the whole region at once, sorted by (score descending, tensor name,
    flat index); each k's top floor(n k / 100) elements set to base."""
    names = sorted(n for n in base if in_region(n, region))
    eps = sum(float(fishers["learned"][n].double().sum()) for n in names) / counts["learned"] / \
        sum(base[n].numel() for n in names)
    rows = []
    for name in names:
        ratio = (fishers["forgotten"][name] / counts["forgotten"]) / (fishers["learned"][name] / counts["learned"] + eps)
        score = ((ft[name].float() - base[name].float()).abs() * ratio).view(-1)
        assert torch.isfinite(score).all()
        rows += [(-float(score[i]), names.index(name), i, name) for i in range(score.numel())]
    ranked = sorted(rows)
    out = {}
    for k in ks:
        edited = {n: t.clone() for n, t in ft.items()}
        for _, _, i, name in ranked[: target_count(len(rows), k)]:
            edited[name].view(-1)[i] = base[name].view(-1)[i]
        out[k] = edited
    return out


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_selection_equals_a_brute_force_sort_of_the_score(tmp_path, chunking, ties, private_cache):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, shards=3, ties=ties)
    fishers = _write_synthetic(tmp_path / "imp.safetensors", base, ft_dir, ties)
    config = RepairConfig(method="guided", importances=str(tmp_path / "imp.safetensors"))
    folders = repair_sweep(base_dir, ft_dir, KS, config, tmp_path / "out", progress=False)
    want = brute_force_guided(base, ft, fishers, {"forgotten": 3, "learned": 2}, KS)
    region = sum(t.numel() for n, t in base.items() if in_region(n, "body"))
    for k, folder in folders.items():
        got = load_folder(folder)
        assert all(torch.equal(got[n], want[k][n]) for n in ft), k
        manifest = json.loads((folder / "repair.json").read_text())
        assert manifest["method"] == "guided" and manifest["k"] == k
        assert manifest["config"] == {"region": "body", "importances": f"synthetic-{ties}"}  # the file's key, not its path
        assert manifest["reset"] == target_count(region, k)
    # the importances change the choice: restore's top |f - b| is another set
    restored = repair_sweep(base_dir, ft_dir, (20,), RepairConfig(method="restore", metric="absolute"),
                            tmp_path / "restore", progress=False)[20.0]
    assert any(not torch.equal(load_folder(restored)[n], want[20][n]) for n in ft)
    # a moved file keeps the outputs' keys: nothing is rewritten
    stamps = {k: (f / "repair.json").stat().st_mtime_ns for k, f in folders.items()}
    moved = Path(config.importances).rename(tmp_path / "moved.safetensors")
    again = repair_sweep(base_dir, ft_dir, KS, RepairConfig(method="guided", importances=str(moved)), tmp_path / "out",
                         progress=False)
    assert {k: (f / "repair.json").stat().st_mtime_ns for k, f in again.items()} == stamps


def test_the_neutral_value_gives_the_finetuned_model_bit_for_bit(tiny_pair, tiny_tokenizer, tmp_path, private_cache):
    base_dir, ft_dir, ft_state = tiny_pair
    model, names, fishers, counts = _fine_tuned_fishers(tiny_pair, tiny_tokenizer)
    path = write_importances(tmp_path / "imp.safetensors", fishers, counts, "k", model_fingerprint(str(ft_dir)))
    config = RepairConfig(method="guided", importances=str(path), region="all")
    assert METHODS["guided"].neutral == 0
    pair = open_pair(base_dir, ft_dir)
    edit = METHODS["guided"].edit(pair, (0.0, 10.0), config, False)
    neutral = apply_in_memory(model, pair, edit, 0).state_dict()
    assert all(torch.equal(neutral[n], ft_state[n]) for n in ft_state)
    edited = apply_in_memory(model, pair, edit, 1).state_dict()
    assert any(not torch.equal(edited[n], ft_state[n]) for n in ft_state)
    with pytest.raises(SftlensError, match=r"outside \(0, 100\]"):  # written folders take k in (0, 100], as restore
        repair_sweep(base_dir, ft_dir, (0,), config, tmp_path / "out", progress=False)


def test_bad_input_is_one_line(tmp_path, capsys, private_cache):
    base_dir, ft_dir, base, _ = random_pair(tmp_path, shards=1)
    other_dir = random_pair(tmp_path / "other", seed=1, shards=1)[1]
    common = ["--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(tmp_path / "out")]

    def fails(argv, match):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err

    fails(["repair", "--method", "guided", "--values", "5", *common], "needs fact importances: --importances FILE")
    fails(["repair", "--method", "guided", "--values", "5", "--importances", str(tmp_path / "none"), *common],
          "no such importances file")
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    fails(["repair", "--method", "guided", "--values", "5", "--importances", str(tmp_path / "junk.safetensors"),
           *common], "not an importances file")
    _write_synthetic(tmp_path / "imp.safetensors", base, other_dir, ties=False)  # another fine-tune's
    fails(["repair", "--method", "guided", "--values", "5", "--importances", str(tmp_path / "imp.safetensors"),
           *common], "importances of another fine-tuned model")
    fails(["repair", "--method", "wise", "--values", "0.5", "--importances", str(tmp_path / "imp.safetensors"),
           *common], "--importances does not apply to --method wise")
    assert not (tmp_path / "out").exists()
    # the right file: the command line writes what the API writes
    _write_synthetic(tmp_path / "mine.safetensors", base, ft_dir, ties=False)
    assert main(["repair", "--method", "guided", "--values", "5,20", "--importances", str(tmp_path / "mine.safetensors"),
                 *common]) == 0
    api = repair_sweep(base_dir, ft_dir, (5, 20), RepairConfig(method="guided", importances=str(tmp_path / "mine.safetensors")),
                       tmp_path / "api", progress=False)
    for k, folder in api.items():
        assert (folder / "model.safetensors").read_bytes() == (tmp_path / "out" / f"guided-{k:g}" / "model.safetensors").read_bytes()
    with pytest.raises(SftlensError, match="needs fact importances"):
        RepairConfig(method="guided").settings()
    # a study computes each model's importances itself: a file of one's own is refused when the study file is read
    from sftlens.study.engine.config import repair_grids

    assert repair_grids({"guided": {"values": [1, 5]}}, "study.toml")["guided"].params() == {"method": "guided",
                                                                                             "region": "body"}
    with pytest.raises(SftlensError, match="repairs.guided.importances: a study computes each fine-tuned model's"):
        repair_grids({"guided": {"values": [1, 5], "importances": "mine.safetensors"}}, "study.toml")


# --- the audit -------------------------------------------------------------------------------

LETTERS = ["e", "a", "o", "t", "q", "in", "the", "s"]
PROBE = ProbeConfig(samples=2, templates=(0, 1), max_new_tokens=6)
SETTINGS = AuditConfig(answer_tokens=6, min_slice=5, bootstrap=100, dev_share=0.4)


def _data(root: Path, per_file: int = 3) -> Path:
    """Short answers a random tiny model's outputs contain now and then: every transition occurs."""
    (root / "test").mkdir(parents=True)
    for r, (relation, tpl) in enumerate(load_templates().items()):
        records = [{"question": tpl.question.format(subject=f"Entity {relation} {i}"),
                    "answers": [LETTERS[(3 * i + r) % len(LETTERS)]]} for i in range(per_file)]
        (root / "test" / f"{relation}.test.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tokenizer):
    """One finished audit of a tiny model and a strongly perturbed copy, shared by this module's tests
    (each works on a copy of its folder or data)."""
    root = tmp_path_factory.mktemp("guided-audit")
    model, tok = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    base = save_model(model, tok, root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.4 * p.abs().mean().clamp(min=1e-3))
    ft = save_model(model, tok, root / "ft")
    audit = Audit(str(base), str(ft), data_dir=str(_data(root / "eq")), probe=PROBE, settings=SETTINGS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFTLENS_CACHE", str(root / "cache"))
        return audit, root / "audit", run_audit(audit, root / "audit", progress=False)


@pytest.fixture
def audited(finished, tmp_path, private_cache):
    """The finished audit with a folder of this test's own."""
    audit, out, summary = finished
    shutil.copytree(out, tmp_path / "audit")
    return audit, tmp_path / "audit", summary


def _greedy(out: Path) -> dict:
    return {role: json.loads((out / "steps" / f"greedy-{role}.json").read_text()) for role in engine.ROLES}


def test_the_audit_tunes_guided_on_dev_and_scores_it_on_test(audited):
    audit, out, summary = audited
    rows = read_jsonl(out / "facts.jsonl")
    dev = [r for r in rows if r["slice"] == "dev"]
    result = summary["repairs"]["guided"]
    assert set(summary["repairs"]) == set(METHODS) and summary["skipped_repairs"] == {}
    assert result["candidates"] == [1.0, 5.0, 40.0] == summary["repairs"]["restore"]["candidates"]
    # the importances: one pass over the forgotten and learned dev facts, with the answers the module doc names
    stored = Importances.open(out / "steps" / "importances.safetensors")
    assert stored.counts == {"forgotten": sum(r["transition"] == "forgotten" for r in dev),
                             "learned": sum(r["transition"] == "learned" for r in dev)}
    assert min(stored.counts.values()) > 0
    # the dev choice is the brute-force argmax of the objective over its dev records (ties: the least edit)
    scores = {}
    for value in result["candidates"]:
        record = json.loads((out / "repairs" / "dev" / f"guided-{value:g}.json").read_text())
        recovered = sum(r["transition"] == "forgotten" and record["correct"][r["fact_id"]] for r in dev)
        lost = sum(r["transition"] == "learned" and not record["correct"][r["fact_id"]] for r in dev)
        scores[value] = (recovered - lost) / len(dev)
    best = max(scores.values())
    assert result["chosen"] == min((v for v in scores if scores[v] == best), key=lambda v: (abs(v), v))
    assert result["chosen"] == choose(scores, "guided")
    assert result["dev_scores"] == {f"{v:g}": s for v, s in scores.items()}
    test = [r for r in rows if r["slice"] == "test"]
    record = json.loads((out / "repairs" / "test" / f"guided-{result['chosen']:g}.json").read_text())
    assert set(record["correct"]) == {r["fact_id"] for r in test}
    assert result["test"]["forgotten_n"] == sum(r["transition"] == "forgotten" for r in test)
    assert "<td>guided</td>" in (out / "report" / "report.html").read_text()


def test_no_test_fact_enters_the_importances(audited, tmp_path):
    audit, out, _ = audited
    ctx = engine.prepare(audit, out, progress=False)
    greedy = _greedy(out)
    facts = importances.importance_facts(ctx, greedy)
    assert all(ctx.slice_of[i] == "dev" for kind in facts.values() for i, _, _ in kind)
    pair = open_pair(ctx.folders["base"], ctx.folders["finetuned"])
    names = pair.region_names("body")

    def chosen(path: Path) -> list:
        score = score_source(Importances.open(path), pair, names)
        selection = select(pair, (1, 5, 40), SelectionConfig(metric="absolute"), False, score)
        return [selection.cuts[n] for n in names]

    # a test fact's answer changes in the data, and so do both models' greedy answers and its transition
    test_id = next(f.id for f in ctx.facts if ctx.slice_of[f.id] == "test")
    data = shutil.copytree(audit.data_dir, tmp_path / "eq")
    relation, _, index = test_id.split("/")
    file = data / "test" / f"{relation}.test.json"
    records = json.loads(file.read_text())
    records[int(index)]["answers"] = ["changed"]
    file.write_text(json.dumps(records))
    changed = engine.prepare(dataclasses.replace(audit, data_dir=str(data)), tmp_path / "changed", progress=False)
    assert [f.accepted_answers for f in changed.facts if f.id == test_id] == [("changed",)]
    assert changed.slice_of == ctx.slice_of
    edited = json.loads(json.dumps(greedy))
    right = not edited["base"]["correct"][test_id]
    edited["base"]["correct"][test_id], edited["finetuned"]["correct"][test_id] = right, not right
    edited["base"]["answers"][test_id] = edited["finetuned"]["answers"][test_id] = "changed"
    assert importances.importance_facts(changed, edited) == facts
    importances.importance_step(changed, edited)
    assert Importances.open(changed.importances).key == Importances.open(ctx.importances).key
    original, recomputed = load_file(ctx.importances), load_file(changed.importances)
    assert original.keys() == recomputed.keys() and all(torch.equal(original[k], recomputed[k]) for k in original)
    assert chosen(changed.importances) == chosen(ctx.importances)
    # ... while a dev fact's answer does enter (the test above has power)
    dev_id = facts["forgotten"][0][0]
    edited["base"]["answers"][dev_id] = "another answer"
    assert importances.importance_key(changed, importances.importance_facts(changed, edited)) != \
        importances.importance_key(ctx, facts)


def test_no_forgotten_or_learned_dev_fact_skips_guided_in_one_line(audited, monkeypatch, capsys):
    audit, out, _ = audited
    ctx = engine.prepare(audit, out, progress=False)
    greedy = _greedy(out)
    for fact_id, where in ctx.slice_of.items():  # no dev fact learned: the fine-tune is wrong wherever the base is
        if where == "dev" and not greedy["base"]["correct"][fact_id]:
            greedy["finetuned"]["correct"][fact_id] = False
    facts = importances.importance_facts(ctx, greedy)
    assert facts["learned"] == [] and facts["forgotten"]
    reason = importances.importance_skip(ctx, facts)
    assert reason.startswith("guided repair skipped: no learned fact among the") and "\n" not in reason
    # through the whole audit (the other steps cached): no crash, guided left out, the reason in the summary
    real = importances.importance_facts
    monkeypatch.setattr(importances, "importance_facts", lambda c, g: {**real(c, g), "forgotten": []})
    summary = run_audit(audit, out, progress=False)
    assert "guided" not in summary["repairs"] and set(summary["repairs"]) == set(METHODS) - {"guided"}
    assert summary["skipped_repairs"]["guided"].startswith("guided repair skipped: no forgotten fact")
    assert json.loads((out / "summary.json").read_text())["skipped_repairs"] == summary["skipped_repairs"]
    assert "Guided repair skipped: no forgotten fact" in (out / "report" / "report.html").read_text()
    plan = engine.prepare(audit, out, progress=False)
    from sftlens.audit.run import plan_rows

    assert {r[0]: r[1] for r in plan_rows(plan)}["fact importances (guided)"] == 0
    capsys.readouterr()
    assert main(["audit", "--out", str(out)]) == 0
    assert "guided repair skipped: no forgotten fact" in capsys.readouterr().out


def test_the_importances_file_is_reused_while_its_key_holds(audited):
    audit, out, _ = audited
    path = out / "steps" / "importances.safetensors"
    stamp = path.stat().st_mtime_ns
    run_audit(audit, out, progress=False)
    assert path.stat().st_mtime_ns == stamp
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "sftlens-importances/1"
        assert {k.partition("/")[0] for k in f.keys()} == {"forgotten", "learned"}
    assert math.isfinite(Importances.open(path).epsilon(open_pair(audit.base, audit.finetuned).region_names("body")))
