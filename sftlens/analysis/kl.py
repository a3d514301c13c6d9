"""Token-level KL divergence between a fine-tuned model and its base (paper Section 4, Figure 5).

For each prompt, both models' logits for the first generated token are taken; the fine-tuned
model's `top_k` (10) highest logits pick the token ids, the base model's logits are read at the
same ids, each set of k logits is softmaxed on its own ("logits re-normalization", Figure 3) and
KL(p_ft || p_base) = sum_i p_i (log p_i - log p'_i) is computed in fp32.

The paper prompts with the relation's mapping template of highest probe success rate and keeps
only facts whose base completion starts with the answer; both are settings here (prompt style,
`answer_within`), and the template per relation is an argument, so the core does not need a
probe.

`first_token_kl(ft_model, base_model, tokenizer, prompts, top_k)` takes a prompt as a string or a
(fine-tuned, base) pair, `KL_CHUNK` prompts at a time, so memory does not grow with the facts;
`compute_kl(base, ft, test_file, KLConfig, templates, out_dir)` -> {`summary`: n, mean, median, std, q25,
q75, min, max; `facts`: [{fact_id, kl}]}, cached in `out_dir/kl.json` by its inputs (`batch_size` not
keyed). Figure 5 is drawn by the study report.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sftlens.config import NOT_KEYED, add_config_arguments, config_from_args, config_to_dict, keyed_dict
from sftlens.data import Fact, default_matcher, encode_prompt, load_fact_set, load_templates, sft_prompt
from sftlens.data.facts import RelationTemplates
from sftlens.data.rows import data_manifest, read_split_rows
from sftlens.errors import SftlensError
from sftlens.evaluate import generate_answers
from sftlens.io import KeyedOutput, stable_hash
from sftlens.models import load_model, model_fingerprint
from sftlens.probe import best_templates, load_probe

KL_FILE = "kl.json"
KL_ROW_KEYS = ("fact_id", "relation", "question", "answers")


@dataclass(frozen=True)
class KLConfig:
    top_k: int = field(default=10, metadata={"help": "fine-tuned model's highest logits compared"})
    prompt_style: Literal["template", "sft", "mixed"] = field(
        default="template",
        metadata={"help": "template: both models complete the relation's mapping template (the paper); "
                          "sft: both get the SFT prompt; mixed: fine-tuned gets the SFT prompt, base the template"})
    answer_within: int = field(
        default=0, metadata={"help": "keep only facts whose greedy base completion of this many tokens "
                                     "contains the answer (the paper's filter; 0 = keep all)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass", **NOT_KEYED})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})

    def __post_init__(self):
        if self.top_k < 2:
            raise ValueError(f"top_k must be at least 2, got {self.top_k}")
        if self.answer_within < 0 or self.batch_size < 1:
            raise ValueError("answer_within must be >= 0 and batch_size >= 1")


def first_token_logits(model, tokenizer, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """(len(prompts), vocab) fp32 logits of the token following each prompt (BOS + prompt).

    Batches are right-padded: a causal model's logits at a real position never see the padding,
    so no position ids need adjusting."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[torch.Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = mask.sum(1) - 1
            for row, i in enumerate(idx):
                out[i] = logits[row, last[row]].float().cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def top_k_kl(ft_logits: torch.Tensor, base_logits: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """KL(p_ft || p_base) per row over the fine-tuned model's top_k token ids, each set softmaxed."""
    if ft_logits.shape != base_logits.shape:
        raise SftlensError(f"the models' vocabularies differ ({ft_logits.shape[-1]} vs {base_logits.shape[-1]} logits)")
    ids = ft_logits.topk(top_k, dim=-1).indices
    log_p = torch.log_softmax(ft_logits.float().gather(-1, ids), dim=-1)
    log_q = torch.log_softmax(base_logits.float().gather(-1, ids), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# Prompts whose vocabulary-wide logits are held at once: each prompt costs two vocab-sized fp32 rows
# (200 KB for a 49 k vocabulary), so an audit of 100 k facts would otherwise hold 40 GB.
KL_CHUNK = 256


def first_token_kl(ft_model, base_model, tokenizer, prompts: Sequence[str | tuple[str, str]], top_k: int = 10,
                   batch_size: int = 16) -> list[float]:
    """KL per prompt; a prompt is one string for both models or a (fine-tuned, base) pair."""
    pairs = [(p, p) if isinstance(p, str) else tuple(p) for p in prompts]
    values: list[float] = []
    for start in range(0, len(pairs), KL_CHUNK):
        chunk = pairs[start:start + KL_CHUNK]
        ft = first_token_logits(ft_model, tokenizer, [p[0] for p in chunk], batch_size)
        base = first_token_logits(base_model, tokenizer, [p[1] for p in chunk], batch_size)
        values += top_k_kl(ft, base, top_k).tolist()
    return values


def subject_of(row: dict, relations: dict[str, RelationTemplates] | None = None) -> str:
    """The subject, read back from the question through the relation's question template
    (`relations`: a fact set's topics; default the paper's relations)."""
    relation = _relation(row, relations)
    match = relation.question_pattern.match(row["question"]) if "{subject}" in relation.question else None
    if match is None:
        raise SftlensError(f"fact {row['fact_id']}: question {row['question']!r} does not fit its relation's template")
    return match.group(1)


def _relation(row: dict, relations: dict[str, RelationTemplates] | None) -> RelationTemplates:
    relations = relations or load_templates()
    if row["relation"] not in relations:
        raise SftlensError(f"fact {row['fact_id']}: unknown relation {row['relation']!r}")
    return relations[row["relation"]]


def kl_prompts(rows: list[dict], style: str, templates: dict[str, int],
               relations: dict[str, RelationTemplates] | None = None) -> list[tuple[str, str]]:
    """(fine-tuned prompt, base prompt) per row; `templates` maps relation -> mapping-template index;
    `relations`: a fact set's topics (a question-only topic's one template is the question itself)."""
    pairs = []
    for row in rows:
        sft = sft_prompt(row["question"])
        template = _relation(row, relations).mapping_templates[templates.get(row["relation"], 0)]
        subject = subject_of(row, relations) if "{subject}" in template else ""
        mapped = template.format(subject=subject, question=row["question"])
        pairs.append({"template": (mapped, mapped), "sft": (sft, sft), "mixed": (sft, mapped)}[style])
    return pairs


def answer_near_start(base_model, tokenizer, rows: list[dict], prompts: list[str], max_new_tokens: int,
                      batch_size: int) -> list[bool]:
    """Whether the base model's greedy completion of `max_new_tokens` tokens contains the answer."""
    matcher = default_matcher()
    keep = []
    for start in range(0, len(rows), batch_size):
        texts = generate_answers(base_model, tokenizer, prompts[start:start + batch_size], max_new_tokens)
        keep += [matcher.is_correct(t, r["answers"]) for t, r in zip(texts, rows[start:start + batch_size])]
    return keep


def summarize_kl(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered[0],) * 3
    return {"n": len(ordered), "mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "std": statistics.pstdev(ordered), "q25": q1, "q75": q3, "min": ordered[0], "max": ordered[-1]}


def kl_for_models(ft_model, base_model, tokenizer, rows: list[dict], config: KLConfig,
                  templates: dict[str, int], relations: dict[str, RelationTemplates] | None = None) -> dict:
    """Per-fact KL and its summary for split rows (fact_id, relation, question, answers)."""
    pairs = kl_prompts(rows, config.prompt_style, templates, relations)
    if config.answer_within:
        keep = answer_near_start(base_model, tokenizer, rows, [p[1] for p in pairs], config.answer_within,
                                 config.batch_size)
        rows = [r for r, k in zip(rows, keep) if k]
        pairs = [p for p, k in zip(pairs, keep) if k]
    values = first_token_kl(ft_model, base_model, tokenizer, pairs, config.top_k, config.batch_size)
    return {"summary": summarize_kl(values),
            "facts": [{"fact_id": r["fact_id"], "kl": v} for r, v in zip(rows, values)]}


def compute_kl(base: str, finetuned: str, test_file: str | Path, config: KLConfig = KLConfig(),
               templates: dict[str, int] | None = None, out_dir: str | Path | None = None,
               relations: dict[str, RelationTemplates] | None = None) -> dict:
    """KL of `finetuned` against `base` on a split JSONL file; cached in out_dir/kl.json by inputs.

    `templates` (relation -> mapping-template index, e.g. `sftlens.probe.best_templates`) defaults
    to the first template of every relation; `relations`: a fact set's topics (default the paper's)."""
    rows = read_split_rows(Path(test_file), KL_ROW_KEYS)
    templates = dict(templates or {})
    identity = {"base": model_fingerprint(base), "finetuned": model_fingerprint(finetuned),
                "test": data_manifest(Path(test_file), rows),
                "config": keyed_dict(config),
                "templates": templates}
    if relations is not None:  # only then: the paper's relations keep their keys
        used = {r["relation"] for r in rows}
        identity["topics"] = {t: [rel.question, *rel.mapping_templates] for t, rel in relations.items() if t in used}
    output = KeyedOutput(Path(out_dir) / KL_FILE, stable_hash(identity), stale="redo") if out_dir is not None else None
    cached = output.finished() if output else None
    if cached is not None:
        return cached
    ft_model, tokenizer = load_model(finetuned, dtype=config.dtype, device=config.device)
    base_model, _ = load_model(base, dtype=config.dtype, device=config.device)
    result = {"base": base, "finetuned": finetuned, "test": str(test_file),
              "config": config_to_dict(config), "templates": templates,
              **kl_for_models(ft_model, base_model, tokenizer, rows, config, templates, relations)}
    return output.write(result) if output else {"key": stable_hash(identity), **result}


def _templates_from_probe(store: str, test_file: str) -> dict[str, int]:
    rows = read_split_rows(Path(test_file), KL_ROW_KEYS)
    facts = [Fact(r["fact_id"], r["relation"], "", tuple(r["answers"]), "test", r.get("domain", ""), r["question"])
             for r in rows]
    return best_templates(load_probe(store), facts)


def _run_kl(args: argparse.Namespace) -> None:
    config = config_from_args(KLConfig, args)
    relations = load_fact_set(args.facts).templates if args.facts else None
    templates = _templates_from_probe(args.probe_store, args.test) if args.probe_store else {}
    result = compute_kl(args.base, args.finetuned, args.test, config, templates, args.out, relations)
    s = result["summary"]
    if not s["n"]:
        print("no facts left to compare (see --answer-within)")
        return
    print(f"KL(p_ft || p_base) over the top-{config.top_k} first-token logits, {s['n']} facts: "
          f"mean {s['mean']:.4f}, median {s['median']:.4f}, std {s['std']:.4f}, "
          f"IQR {s['q25']:.4f}-{s['q75']:.4f}, range {s['min']:.4f}-{s['max']:.4f}")
    if args.out:
        print(f"wrote {Path(args.out) / KL_FILE}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("kl", help="first-token KL between a fine-tuned model and its base (Figure 5)")
    parser.add_argument("--base", required=True, help="base model (built-in name, folder or hub id)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (built-in name, folder or hub id)")
    parser.add_argument("--test", required=True, help="split JSONL of facts (the paper: test/in-level4.jsonl)")
    parser.add_argument("--probe-store", help="probe store of the base model: picks each relation's best "
                                              "mapping template (default: the first template)")
    parser.add_argument("--out", help="folder for kl.json (per-fact values and summary; reused when current)")
    parser.add_argument("--facts", help="the fact set the test file was split from (`sftlens data import` folder or "
                                        "native JSONL): its topics' templates (default: EntityQuestions')")
    add_config_arguments(parser, KLConfig)
    parser.set_defaults(func=_run_kl, writes="out")
