"""Probe throughput: sftlens' probe against transformers' batched sampling at its best batch size.

Same facts, same mapping templates, the paper's sampling settings (T = 0.7, 32 new tokens, 10 samples
per template), one process, one after the other. The baseline is what a careful user writes with
plain transformers: left-padded prompts, `generate(do_sample=True, num_return_sequences=10)`, every
logits warper off (top-k 0, top-p 1), at the prompts-per-batch that a search on the first prompts
found fastest. sftlens runs `probe_facts` at its automatic batch size, and once more with decided
samples kept running to their end (the ablation of stopping at the answer).

Printed: samples/s, generated tokens/s (tokens up to and including EOS), the FLOP rate they mean
(2 x parameters per generated token) as a share of this machine's measured matmul rate, peak RSS
added, and the ratios. The two samplers draw differently (sftlens: per-sample seeded Gumbel-max), so
results are compared as distributions: mean R, facts per mastery level, correct samples.

    python bench/probe_throughput.py                       # ~15 min on 2 idle cores (2026-12-01)
    python bench/probe_throughput.py --facts 2 --templates 0,1
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from sftlens.data import default_matcher, encode_prompt, load_facts, load_templates
from sftlens.decoding import left_pad
from sftlens.probe import ProbeConfig, cpu_batch_size, mastery_level, probe_facts
from sftlens.probe import sampling as probe_sampling

REPO = Path(__file__).resolve().parents[1]
SEARCH_BATCHES = (4, 8, 16, 32)


class PeakRss:
    """Peak resident memory above the level at entry, polled every 5 ms."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def matmul_gflops(rows: int, hidden: int, inner: int, repeats: int = 20) -> float:
    a, b = torch.randn(rows, hidden), torch.randn(hidden, inner)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * hidden * inner * repeats / (time.perf_counter() - start) / 1e9


def generated_tokens(sequences: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including each row's first EOS (all of them if none)."""
    is_eos = sequences == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], sequences.shape[1], dtype=torch.long))
    return int(first.sum())


def hf_sample(lm, tokenizer, prompts: list[list[int]], config: ProbeConfig, batch: int) -> tuple[list[list[str]], int]:
    """Texts of `config.samples` plain-transformers samples per prompt, and the tokens generated."""
    from transformers import GenerationConfig

    generation = GenerationConfig(
        do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0, num_beams=1,
        num_return_sequences=config.samples, max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    texts, tokens = [], 0
    with torch.inference_mode():
        for start in range(0, len(prompts), batch):
            ids, mask = left_pad(prompts[start:start + batch], tokenizer.pad_token_id, lm.device)
            out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
            new = out[:, ids.shape[1]:]
            tokens += generated_tokens(new, tokenizer.eos_token_id)
            flat = tokenizer.batch_decode(new, skip_special_tokens=True)
            texts += [flat[i:i + config.samples] for i in range(0, len(flat), config.samples)]
    return texts, tokens


def best_hf_batch(lm, tokenizer, prompts, config: ProbeConfig) -> int:
    """The fastest prompts-per-batch of the baseline, timed on the first prompts (one sequence
    count per candidate, so every candidate decodes the same samples)."""
    probe = prompts[:max(SEARCH_BATCHES)]
    rates = {}
    for batch in SEARCH_BATCHES:
        start = time.perf_counter()
        hf_sample(lm, tokenizer, probe, config, batch)
        rates[batch] = len(probe) * config.samples / (time.perf_counter() - start)
        print(f"  baseline search: {batch:3d} prompts ({batch * config.samples} sequences) per batch: "
              f"{rates[batch]:.1f} samples/s", flush=True)
    return max(rates, key=rates.get)


def sftlens_run(lm, tokenizer, facts, config: ProbeConfig, decided_stop: bool):
    """probe_facts' records and the tokens it generated (decoding wrapped to count them)."""
    counted = {"tokens": 0}
    decode, sampler = probe_sampling.decode, probe_sampling.generate_samples

    def counting_decode(*args, **kwargs):
        out = decode(*args, **kwargs)
        counted["tokens"] += sum(map(len, out))
        return out

    def without_decision(*args, answers=None, **kwargs):
        return sampler(*args, **kwargs)

    probe_sampling.decode = counting_decode
    if not decided_stop:
        probe_sampling.generate_samples = without_decision
    try:
        records = probe_facts(lm, tokenizer, facts, config, progress=False)
    finally:
        probe_sampling.decode, probe_sampling.generate_samples = decode, sampler
    return records, counted["tokens"]


def describe(name: str, counts: list[int], total: int) -> str:
    levels = Counter(mastery_level(c, total) for c in counts)
    mean_r = sum(counts) / (len(counts) * total)
    return (f"{name:28} mean R {mean_r:.3f}; facts per level " + " ".join(f"{levels[i]}" for i in range(5))
            + f"; correct samples {sum(counts)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("SFTLENS_DATA_DIR", str(REPO.parent / "shared/data/entityquestions")))
    parser.add_argument("--relations", default="P17,P19,P36,P495")
    parser.add_argument("--facts", type=int, default=6, help="facts per relation")
    parser.add_argument("--templates", default="0,1,2,3", help="mapping-template indices per fact")
    args = parser.parse_args(argv)

    from sftlens.models import load_model

    config = ProbeConfig(templates=tuple(int(t) for t in args.templates.split(",")))
    all_facts = load_facts(args.data_dir, splits="test", relations=args.relations).facts
    facts = [f for rel in args.relations.split(",") for f in [g for g in all_facts if g.relation == rel][:args.facts]]
    lm, tokenizer = load_model(args.model, dtype="fp32", device="cpu")
    templates = load_templates()
    jobs = [(f, t) for f in facts for t in config.templates]
    prompts = [encode_prompt(tokenizer, templates[f.relation].mapping_templates[t].format(subject=f.subject)) for f, t in jobs]
    samples = len(jobs) * config.samples
    auto = cpu_batch_size(lm, max(map(len, prompts)), config)
    print(f"model {args.model} on CPU ({torch.get_num_threads()} threads), {len(facts)} facts x {len(config.templates)} templates "
          f"x {config.samples} samples = {samples} samples, T={config.temperature}, max {config.max_new_tokens} new tokens; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    hf_sample(lm, tokenizer, prompts[:1], config, 1)  # warm-up: pages in the memory-mapped weights
    batch = best_hf_batch(lm, tokenizer, prompts, config)
    with PeakRss() as hf_mem:
        start = time.perf_counter()
        hf_texts, hf_tokens = hf_sample(lm, tokenizer, prompts, config, batch)
        hf_s = time.perf_counter() - start
    matcher = default_matcher()
    hf_counts = Counter()
    for (fact, _), texts in zip(jobs, hf_texts):
        hf_counts[fact.id] += sum(matcher.is_correct(t, fact.answers) for t in texts)

    runs = {}
    for name, decided_stop in (("sftlens", True), ("sftlens, decided kept", False)):
        with PeakRss() as mem:
            start = time.perf_counter()
            records, tokens = sftlens_run(lm, tokenizer, facts, config, decided_stop)
            runs[name] = (time.perf_counter() - start, tokens, mem.added_mib, records)

    params = sum(p.numel() for p in lm.parameters())
    flops_per_token = 2 * params  # the tied embedding counts once: as the output projection
    hidden, inner = lm.config.hidden_size, lm.config.intermediate_size
    peak = matmul_gflops(auto * config.samples, hidden, inner)
    share = lambda tokens, seconds: 100 * tokens / seconds * flops_per_token / 1e9 / peak  # noqa: E731

    print()
    print(f"{'':34}{'samples/s':>10}{'tokens/s':>10}{'tokens':>8}{'% matmul':>9}{'RSS MiB':>9}{'vs HF':>7}")
    print(f"{f'HF generate, {batch} prompts x {config.samples}':34}{samples / hf_s:10.1f}{hf_tokens / hf_s:10.1f}"
          f"{hf_tokens:8d}{share(hf_tokens, hf_s):9.0f}{hf_mem.added_mib:9.0f}{1.0:7.2f}")
    for name, (seconds, tokens, mib, _) in runs.items():
        print(f"{f'{name}, {auto} prompts x {config.samples}':34}{samples / seconds:10.1f}{tokens / seconds:10.1f}"
              f"{tokens:8d}{share(tokens, seconds):9.0f}{mib:9.0f}{hf_s / seconds:7.2f}")
    print()
    print(f"model: {params / 1e6:.1f}M parameters, {flops_per_token / 1e6:.0f} MFLOP per generated token; "
          f"matmul rate ({auto * config.samples}x{hidden} @ {hidden}x{inner}, fp32): {peak:.1f} GFLOP/s")
    total = len(config.templates) * config.samples
    print(describe("HF generate", [hf_counts[f.id] for f in facts], total))
    for name, (*_, records) in runs.items():
        print(describe(name, [records[f.id].correct for f in facts], total))
    same = runs["sftlens"][3] == runs["sftlens, decided kept"][3]
    print(f"stopping decided samples changed {'no' if same else 'SOME'} probe records")
    seconds = runs["sftlens"][0]
    print(f"targets: probe >= 2x HF batched: {hf_s / seconds:.2f}x; >= 70 % of the matmul rate: "
          f"{share(runs['sftlens'][1], seconds):.0f} %; load average now {os.getloadavg()[0]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
