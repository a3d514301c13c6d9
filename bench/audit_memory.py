"""Audit memory against the number of facts: peak RSS of `sftlens audit` at 1k, 5k and 20k facts, in one run.

What grows with the facts is the audit's own bookkeeping (fact rows, probe records, answers, KL values,
the report's tables), not the models, so the pair here is a tiny random Llama (2 layers, hidden 64) with
SmolLM2-135M's real tokenizer and a perturbed copy of it as the fine-tune: the same code paths, the same
prompts and token budgets, in minutes instead of hours. Each size runs in a fresh process (`spawn`), so
each peak (a high-water mark) is its own; facts come from EntityQuestions' train split (at least 1,763
per relation, so every relation gives its share). Probe: 1 template x 2 samples of at most 8 tokens;
answers of 16 tokens; every repair method at 3 candidates.

    python bench/audit_memory.py                       # 1,008 / 5,016 / 20,016 facts
    python bench/audit_memory.py --per-relation 42 209   # any sizes (facts per relation x 24 relations)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "entityquestions"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_pair(work: Path) -> tuple[str, str]:
    """A tiny random Llama with SmolLM2's tokenizer, and a copy with every weight moved by seeded noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlens.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    folders = []
    model = LlamaForCausalLM(config).eval()
    for name, noise in (("base", 0.0), ("finetuned", 0.05)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        folder = work / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders[0], folders[1]


def audit_once(base: str, finetuned: str, data_dir: str, per_relation: int, out: str) -> dict:
    """One audit in this (fresh) process: its peak RSS, the RSS before it, its wall time and fact count."""
    sys.path.insert(0, str(REPO))
    import torch

    from sftlens.audit import Audit, AuditConfig, run_audit
    from sftlens.probe import ProbeConfig

    torch.set_num_threads(2)
    audit = Audit(base, finetuned, data_dir=data_dir, split="train", limit=per_relation,
                  probe=ProbeConfig(samples=2, templates=(0,), max_new_tokens=8, stop_at_newline=True),
                  settings=AuditConfig(answer_tokens=16, min_slice=5, bootstrap=200))
    before = rss_mb()
    start = time.perf_counter()
    summary = run_audit(audit, out, progress=False)
    return {"facts": summary["facts"], "wall_s": round(time.perf_counter() - start, 1),
            "rss_before_mb": round(before), "peak_rss_mb": round(rss_mb()),
            "peak_beyond_start_mb": round(rss_mb() - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--per-relation", type=int, nargs="+", default=[42, 209, 834],
                        help="facts per relation of each audit (x 24 relations)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            base, finetuned = pool.submit(tiny_pair, work).result()
        rows = []
        for n in args.per_relation:
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # a fresh process: its own peak
                rows.append(pool.submit(audit_once, base, finetuned, args.data_dir, n, str(work / f"audit-{n}")).result())
    first = rows[0]["peak_beyond_start_mb"]
    print(json.dumps({"audits": rows, "growth_vs_smallest_mb": [r["peak_beyond_start_mb"] - first for r in rows],
                      "mb_per_1k_facts": round((rows[-1]["peak_beyond_start_mb"] - first)
                                               / max(1, (rows[-1]["facts"] - rows[0]["facts"]) / 1000), 1)},
                     indent=2))


if __name__ == "__main__":
    main()
