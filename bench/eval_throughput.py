"""Evaluation throughput: sftlens' greedy evaluation against transformers' batched `generate`.

Same test facts, same model, same prompts (the Appendix A format, 16 new tokens), one process, one
after the other. By default the model is SmolLM2-135M fine-tuned here on 60 in-domain training facts
with the paper's recipe (about half a minute), as a study evaluates fine-tuned models: they end their
answers with EOS, which `generate` pads along while sftlens drops the row. `--sft 0` measures the base
model instead. Both sides are timed at each batch size of a search on the first facts, then run on
all facts at their best one; sftlens also at its default batch size. The predictions must be
identical (greedy decoding: results do not depend on the batch or on who decodes).

Printed: facts/s, generated tokens/s (up to and including EOS), their FLOP rate (2 x parameters per
token) as a share of this machine's measured matmul rate, and the ratio to the baseline.

    python bench/eval_throughput.py                  # ~10 min on 2 idle cores (2026-12-01)
    python bench/eval_throughput.py --facts 128 --sft 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from sftlens import evaluate as evaluate_module
from sftlens.data import encode_prompt, in_domain_relations, load_facts, sft_completion, sft_prompt
from sftlens.decoding import left_pad
from sftlens.evaluate import EvalConfig, evaluate_model
from sftlens.models import load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "entityquestions"
SEARCH_BATCHES = (16, 32, 64, 128, 256)


def split_rows(data_dir: Path, split: str, n: int) -> list[dict]:
    facts = load_facts(data_dir, splits=split, relations=in_domain_relations()).facts
    random.Random(0).shuffle(facts)
    return [{"fact_id": f.id, "relation": f.relation, "domain": f.domain, "level": 0, "question": f.question,
             "answers": list(f.answers), "prompt": sft_prompt(f.question), "completion": sft_completion(f.answers[0])}
            for f in facts[:n]]


def fine_tuned(data_dir: Path, examples: int, work: Path) -> str:
    from sftlens.train import TrainConfig, train

    sft = work / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in split_rows(data_dir, "train", examples)))
    return str(train("smollm2-135m", sft, work / "model", TrainConfig(), progress=False))


def hf_answers(model, tokenizer, rows: list[dict], batch: int, max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy answers by transformers' batched `generate` (finished rows padded along), and the
    tokens generated up to and including EOS."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts, tokens = [], 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            ids, mask = left_pad([encode_prompt(tokenizer, r["prompt"]) for r in rows[start:start + batch]],
                                 tokenizer.pad_token_id, model.device)
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
            ended = (new == tokenizer.eos_token_id).int()
            tokens += int(torch.where(ended.any(1), ended.argmax(1) + 1, new.shape[1]).sum())
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, tokens


def sftlens_answers(model, tokenizer, rows: list[dict], batch: int, max_new_tokens: int) -> tuple[list[str], int]:
    counted = {"tokens": 0}
    decode = evaluate_module.decode

    def counting_decode(*args, **kwargs):
        out = decode(*args, **kwargs)
        counted["tokens"] += sum(map(len, out))
        return out

    evaluate_module.decode = counting_decode
    try:
        predictions = evaluate_model(model, tokenizer, rows, EvalConfig(batch_size=batch, max_new_tokens=max_new_tokens), progress=False)
    finally:
        evaluate_module.decode = decode
    return [p["prediction"] for p in predictions], counted["tokens"]


def timed(run, *args):
    start = time.perf_counter()
    texts, tokens = run(*args)
    return texts, tokens, time.perf_counter() - start


def best_batch(name: str, run, model, tokenizer, rows, max_new_tokens: int) -> int:
    sample = rows[:max(SEARCH_BATCHES)]
    rates = {}
    for batch in SEARCH_BATCHES:
        seconds = timed(run, model, tokenizer, sample, batch, max_new_tokens)[2]
        rates[batch] = len(sample) / seconds
        print(f"  {name} search: batch {batch:4d}: {rates[batch]:6.1f} facts/s", flush=True)
    return max(rates, key=rates.get)


def matmul_gflops(rows: int, hidden: int, inner: int, repeats: int = 20) -> float:
    a, b = torch.randn(rows, hidden), torch.randn(hidden, inner)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * hidden * inner * repeats / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    parser.add_argument("--sft", type=int, default=60, help="fine-tune on this many training facts first (0: the base model)")
    parser.add_argument("--model", default=None, help="evaluate this model folder instead (no fine-tuning)")
    parser.add_argument("--data-dir", default=os.environ.get("SFTLENS_DATA_DIR", DEFAULT_DATA))
    args = parser.parse_args()

    data_dir = Path(args.data_dir)
    rows = split_rows(data_dir, "test", args.facts)
    with tempfile.TemporaryDirectory() as work:
        name = args.model or (fine_tuned(data_dir, args.sft, Path(work)) if args.sft else "smollm2-135m")
        model, tokenizer = load_model(name, dtype="fp32", device="cpu")
        label = args.model or (f"SmolLM2-135M fine-tuned on {args.sft} facts" if args.sft else "SmolLM2-135M base")
        print(f"{label}; {len(rows)} test facts, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        hf_answers(model, tokenizer, rows[:2], 2, 2)  # warm-up: pages in the memory-mapped weights
        hf_batch = best_batch("HF generate", hf_answers, model, tokenizer, rows, args.max_new_tokens)
        ours_batch = best_batch("sftlens", sftlens_answers, model, tokenizer, rows, args.max_new_tokens)
        results = {f"HF generate, batch {hf_batch}": timed(hf_answers, model, tokenizer, rows, hf_batch, args.max_new_tokens)}
        for batch in dict.fromkeys((ours_batch, EvalConfig.batch_size)):
            results[f"sftlens, batch {batch}"] = timed(sftlens_answers, model, tokenizer, rows, batch, args.max_new_tokens)

    params = sum(p.numel() for p in model.parameters())
    prompt_tokens = sum(len(encode_prompt(tokenizer, r["prompt"])) for r in rows)
    peak = matmul_gflops(hf_batch, model.config.hidden_size, model.config.intermediate_size)
    baseline_texts, _, baseline_s = next(iter(results.values()))
    print()
    share = lambda tokens, seconds: 100 * tokens / seconds * 2 * params / 1e9 / peak  # noqa: E731
    print(f"{'':26}{'facts/s':>9}{'tokens/s':>10}{'tokens':>8}{'% matmul':>9}{'+prompts':>9}{'vs HF':>7}{'identical':>11}")
    for name, (texts, tokens, seconds) in results.items():
        same = sum(a == b for a, b in zip(texts, baseline_texts))
        print(f"{name:26}{len(rows) / seconds:9.1f}{tokens / seconds:10.1f}{tokens:8d}{share(tokens, seconds):9.0f}"
              f"{share(tokens + prompt_tokens, seconds):9.0f}{baseline_s / seconds:7.2f}{f'{same}/{len(rows)}':>11}")
    print(f"\n% matmul: generated tokens x 2 x parameters per second over the measured matmul rate; +prompts: "
          f"counting the {prompt_tokens} prompt tokens ({prompt_tokens / len(rows):.1f} per fact) each side runs once")
    identical = all(texts == baseline_texts for texts, _, _ in results.values())
    best = min(seconds for _, _, seconds in list(results.values())[1:])
    print(f"matmul rate ({hf_batch}x{model.config.hidden_size} @ {model.config.hidden_size}x{model.config.intermediate_size}, fp32): "
          f"{peak:.1f} GFLOP/s; target eval >= 2x batched HF generate: {baseline_s / best:.2f}x; predictions "
          f"{'identical' if identical else 'DIFFER'}; load average now {os.getloadavg()[0]:.2f}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
