"""Probe throughput: sftlens' batched probe versus a naive generate loop, same facts and settings.

The naive loop is what one would write first: one prompt at a time, `num_return_sequences` samples,
plain `generate` sampling, no stop strings. Both run the paper's sampling settings (temperature 0.7,
32 new tokens, 10 samples) on the same prompts, in this process, one after the other. Printed:
samples/s, generated tokens/s (tokens up to and including EOS), their ratio, the peak resident
memory added by each phase, and the machine's measured matmul throughput next to the FLOP rate the
probe achieves (2 x parameters FLOPs per generated token).

    python bench/probe_throughput.py                       # ~2-3 min on 2 idle cores (9 min at load 8)
    python bench/probe_throughput.py --facts 8 --templates 0,1,2,3
    python bench/probe_throughput.py --invariance          # also: batch size 1 vs auto, sample by sample
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

from sftlens.data import default_matcher, encode_prompt, load_facts, load_templates
from sftlens.probe import ProbeConfig, cpu_batch_size, generate_samples, probe_facts, sample_seed

REPO = Path(__file__).resolve().parents[1]


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


def naive_loop(lm, tokenizer, prompts, facts, config: ProbeConfig) -> tuple[int, int]:
    matcher = default_matcher()
    tokens = correct = 0
    for fact, ids in zip(facts, prompts):
        input_ids = torch.tensor([ids])
        out = lm.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
            temperature=config.temperature, top_k=0, top_p=1.0, num_return_sequences=config.samples,
            max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, input_ids.shape[1]:]
        tokens += generated_tokens(new, tokenizer.eos_token_id)
        correct += sum(matcher.is_correct(t, fact.answers) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return tokens, correct


def probe_tokens(tokenizer, lm, facts, config, prompts_per_batch):
    """Run sftlens' probe; `generate` is wrapped to count the tokens each call produced."""
    counted = {"tokens": 0}
    original = lm.generate

    def counting_generate(*args, **kwargs):
        out = original(*args, **kwargs)
        counted["tokens"] += generated_tokens(out[:, kwargs["input_ids"].shape[1]:], tokenizer.eos_token_id)
        return out

    lm.generate = counting_generate
    try:
        records = probe_facts(lm, tokenizer, facts, config, batch_size=prompts_per_batch, progress=False)
    finally:
        del lm.generate
    return counted["tokens"], sum(r.correct for r in records.values())


def report_invariance(lm, tokenizer, jobs, prompts, config: ProbeConfig, batch: int) -> None:
    """Token-for-token agreement of every sample drawn one prompt at a time and in batches."""
    seeds = [[sample_seed(config.seed, f.id, t, j) for j in range(config.samples)] for f, t in jobs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as the probe batches them
    batched: dict[int, list[str]] = {}
    for start in range(0, len(order), batch):
        part = order[start:start + batch]
        for i, texts in zip(part, generate_samples(lm, tokenizer, [prompts[i] for i in part], [seeds[i] for i in part], config)):
            batched[i] = texts
    same = sum(a == b for i in range(len(prompts))
               for a, b in zip(generate_samples(lm, tokenizer, [prompts[i]], [seeds[i]], config)[0], batched[i]))
    print(f"batch size 1 vs {batch} prompts: {same} of {len(prompts) * config.samples} samples identical token for token")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("SFTLENS_DATA_DIR", str(REPO.parent / "shared/data/entityquestions")))
    parser.add_argument("--relations", default="P17,P19,P36,P495")
    parser.add_argument("--facts", type=int, default=3, help="facts per relation")
    parser.add_argument("--templates", default="0,1", help="mapping-template indices per fact")
    parser.add_argument("--batch-size", type=int, default=0, help="sftlens prompts per batch (0 = auto)")
    parser.add_argument("--invariance", action="store_true",
                        help="also draw every sample one prompt at a time and compare the texts with batched drawing")
    args = parser.parse_args(argv)

    from sftlens.models import load_model

    torch.manual_seed(0)
    config = ProbeConfig(templates=tuple(int(t) for t in args.templates.split(",")))
    all_facts = load_facts(args.data_dir, splits="test", relations=args.relations).facts
    facts = [f for rel in args.relations.split(",") for f in [g for g in all_facts if g.relation == rel][:args.facts]]
    lm, tokenizer = load_model(args.model, dtype="fp32", device="cpu")
    templates = load_templates()
    jobs = [(f, t) for f in facts for t in config.templates]
    prompts = [encode_prompt(tokenizer, templates[f.relation].mapping_templates[t].format(subject=f.subject)) for f, t in jobs]
    samples = len(jobs) * config.samples
    batch = args.batch_size or cpu_batch_size(lm, max(map(len, prompts)), config)
    print(f"model {args.model} on CPU ({torch.get_num_threads()} threads), {len(facts)} facts x {len(config.templates)} templates "
          f"x {config.samples} samples = {samples} samples, T={config.temperature}, max {config.max_new_tokens} new tokens")
    print(f"sftlens batch: {batch} prompts = {batch * config.samples} sequences")

    # Warm-up: pages the memory-mapped weights in, so neither phase is charged for it.
    lm.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with PeakRss() as naive_mem:
        start = time.perf_counter()
        naive_tok, naive_correct = naive_loop(lm, tokenizer, prompts, [f for f, _ in jobs], config)
        naive_s = time.perf_counter() - start
    with PeakRss() as probe_mem:
        start = time.perf_counter()
        probe_tok, probe_correct = probe_tokens(tokenizer, lm, facts, config, batch)
        probe_s = time.perf_counter() - start

    params = sum(p.numel() for p in lm.parameters())
    flops_per_token = 2 * params  # the tied embedding counts once: as the output projection
    hidden, inner = lm.config.hidden_size, lm.config.intermediate_size
    peak = matmul_gflops(batch * config.samples, hidden, inner)
    print()
    print(f"{'':24}{'naive loop':>14}{'sftlens probe':>16}{'ratio':>9}")
    rows = [
        ("wall time (s)", naive_s, probe_s, naive_s / probe_s),
        ("samples/s", samples / naive_s, samples / probe_s, naive_s / probe_s),
        ("generated tokens/s", naive_tok / naive_s, probe_tok / probe_s, (probe_tok / probe_s) / (naive_tok / naive_s)),
        ("generated tokens", naive_tok, probe_tok, probe_tok / naive_tok),
        ("correct samples", naive_correct, probe_correct, float("nan")),
        ("peak RSS added (MiB)", naive_mem.added_mib, probe_mem.added_mib, float("nan")),
    ]
    for name, a, b, r in rows:
        print(f"{name:24}{a:14.1f}{b:16.1f}{r:9.2f}")
    achieved = probe_tok / probe_s * flops_per_token / 1e9
    print()
    print(f"model: {params / 1e6:.1f}M parameters, {flops_per_token / 1e6:.0f} MFLOP per generated token")
    print(f"matmul throughput ({batch * config.samples}x{hidden} @ {hidden}x{inner}, fp32): {peak:.1f} GFLOP/s")
    print(f"sftlens probe achieves {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of it "
          f"(naive: {naive_tok / naive_s * flops_per_token / 1e9:.1f} GFLOP/s)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (the CPU may be shared)")
    if args.invariance:
        report_invariance(lm, tokenizer, jobs, prompts, config, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
