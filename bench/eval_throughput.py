"""Evaluation throughput: batched greedy decoding against one fact at a time, same process.

Both use `sftlens.evaluate.evaluate_model` on the same EntityQuestions test facts with SmolLM2-135M
(fp32, CPU); batch size 1 is the baseline. Reported: facts/s of each, the speed-up, and whether
the predictions are identical (they must be: results do not depend on the batch size).

    python bench/eval_throughput.py                   # 64 facts, batch 32
    python bench/eval_throughput.py --facts 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch

from sftlens.data import in_domain_relations, load_facts, sft_completion, sft_prompt
from sftlens.evaluate import EvalConfig, acc_of, evaluate_model, summarize
from sftlens.models import load_model

DEFAULT_DATA = REPO.parent / "shared" / "data" / "entityquestions"


def test_rows(data_dir: Path, n: int) -> list[dict]:
    facts = load_facts(data_dir, splits="test", relations=in_domain_relations()).facts
    random.Random(0).shuffle(facts)
    return [{"fact_id": f.id, "domain": f.domain, "level": 0, "answers": list(f.answers),
             "prompt": sft_prompt(f.question), "completion": sft_completion(f.answers[0])} for f in facts[:n]]


def timed(model, tokenizer, rows, batch_size: int, max_new_tokens: int):
    config = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    predictions = evaluate_model(model, tokenizer, rows, config, progress=False)
    return predictions, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("SFTLENS_DATA_DIR", DEFAULT_DATA))
    args = parser.parse_args()

    rows = test_rows(Path(args.data_dir), args.facts)
    model, tokenizer = load_model(args.model, device="cpu")
    print(f"{len(rows)} facts, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads", flush=True)
    timed(model, tokenizer, rows[:2], 2, args.max_new_tokens)  # warm-up: first-call allocations
    single, single_s = timed(model, tokenizer, rows, 1, args.max_new_tokens)
    print(f"one at a time: {single_s:7.1f} s  {len(rows) / single_s:6.2f} facts/s", flush=True)
    batched, batched_s = timed(model, tokenizer, rows, args.batch_size, args.max_new_tokens)
    print(f"batch {args.batch_size:>5}: {batched_s:7.1f} s  {len(rows) / batched_s:6.2f} facts/s", flush=True)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(single, batched))
    print(f"speed-up {single_s / batched_s:.2f}x; identical predictions {same}/{len(rows)}; "
          f"accuracy {100 * acc_of(summarize(batched), 'in'):.2f}%")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
