"""Mastery probing (paper Section 3.1, Appendix D.1).

For each fact, every mapping template of its relation is filled with the subject (a question-only
topic, without templates, is asked its question: `question_prompt` plain = the paper's QA format,
chat = the model's chat template) and the base model samples `samples` continuations at
`temperature`; a sample counts when the matcher finds a gold answer (or a synonym) in it.
R_k = correct / (templates x samples) and the mastery level follows.

Sampling is Gumbel-max: each sequence carries its own `torch.Generator`, seeded from (seed, fact,
template, sample index), whose noise is added to logits / T and the argmax taken. That is exact
sampling from softmax(logits / T), and a sequence's draws never depend on which other sequences
share its batch, its batch size or its shard. Decoding (`sftlens.decoding.decode`) drops a sample
from the running batch as soon as it is over: at EOS, with `stop_at_newline` at its first newline
after some non-blank text (a leading newline does not end it), or when its text already contains a
gold answer (decided: R only asks whether an answer appears). The only remaining cross-batch
effect is floating point: batched matmuls may round differently, which can flip a draw only when
two noisy logits tie to ~1e-6 (see `tests/test_probe.py`, which checks every count against
sampling each continuation alone, and `bench/probe_throughput.py`).

Results go to a store directory: `probe.json` (model fingerprint and settings; a store written with
other settings is an error) and one append-only `records-rank{R}.jsonl` per process, one line per
finished fact, so a killed run resumes where it stopped and several ranks merge on load.

Modules: `records` (`ProbeConfig`, `ProbeRecord`, mastery levels), `sampling` (the seeded sampler,
probing facts in memory), `batching` (batch size from free memory), `store` (the resumable multi-rank
store, `run_probe`, `load_probe`, `default_store`), `tables` (Table 1, best templates), `cli` (`sftlens probe`).
"""

from sftlens.probe.batching import cpu_batch_size
from sftlens.probe.records import FAST_PROBE, LEVELS, ProbeConfig, ProbeRecord, mastery_level
from sftlens.probe.sampling import (
    GumbelMaxSampler,
    generate_samples,
    probe_facts,
    prompt_ids,
    sample_seed,
    template_indices,
)
from sftlens.probe.store import default_store, load_probe, process_shard, run_probe, store_meta
from sftlens.probe.tables import best_templates, level_counts, level_counts_table, probe_prompts, write_level_tables

__all__ = [
    "FAST_PROBE", "LEVELS", "GumbelMaxSampler", "ProbeConfig", "ProbeRecord", "best_templates", "cpu_batch_size",
    "default_store",
    "generate_samples", "level_counts", "level_counts_table", "load_probe", "mastery_level", "probe_facts",
    "probe_prompts", "process_shard", "prompt_ids", "run_probe", "sample_seed", "store_meta", "template_indices",
    "write_level_tables",
]
