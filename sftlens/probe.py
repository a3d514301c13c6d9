"""Mastery probing (paper Section 3.1, Appendix D.1).

For each fact, every mapping template of its relation is filled with the subject and the base model
samples `samples` continuations at `temperature`; a sample counts when the matcher finds a gold
answer (or a synonym) in it. R_k = correct / (templates x samples) and the mastery level follows.

Sampling is Gumbel-max: each sequence carries its own `torch.Generator`, seeded from (seed, fact,
template, sample index), whose noise is added to logits / T and the argmax taken. That is exact
sampling from softmax(logits / T), and a sequence's draws never depend on which other sequences
share its batch, its batch size or its shard. Decoding (`sftlens.decoding.decode`) drops a sample
from the running batch as soon as it is over: at EOS, at its first newline with `stop_at_newline`,
or when its text already contains a gold answer (decided: R only asks whether an answer appears).
The only remaining cross-batch effect is floating point: batched matmuls may round differently,
which can flip a draw only when two noisy logits tie to ~1e-6 (see `tests/test_probe.py`, which
checks every count against sampling each continuation alone, and `bench/probe_throughput.py`).

Results go to a store directory: `probe.json` (model fingerprint and settings; a store written with
other settings is an error) and one append-only `records-rank{R}.jsonl` per process, one line per
finished fact, so a killed run resumes where it stopped and several ranks merge on load.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.data import (
    Fact, add_fact_arguments, default_matcher, encode_prompt, fact_set_from_args, load_templates, parse_fact_id,
    select_from_args,
)
from sftlens.data.matching import normalize
from sftlens.decoding import decode
from sftlens.errors import SftlensError
from sftlens.inject import held_out_templates
from sftlens.io import JsonlAppender, atomic_write_json, atomic_write_text, exclusive_writer, read_jsonl, stable_hash
from sftlens.markdown import markdown_table
from sftlens.models import load_model, model_fingerprint, parse_dtype

STORE_FORMAT = 1
META_FILE = "probe.json"
LEVELS = (0, 1, 2, 3, 4)
# Settings that cannot change a result stay out of the store key.
UNKEYED_SETTINGS = ("batch_size",)
# Facts per unit of resumable work, in multiples of the batch: large enough to sort prompts by
# length (little padding), small enough that a kill loses little.
CHUNK_BATCHES = 4
# CPU batches beyond this many sequences stop paying off (the matmuls are already compute-bound).
CPU_MAX_SEQUENCES = 256
# Share of available memory the CPU batch may take (KV cache plus vocabulary-wide score buffers).
CPU_MEMORY_SHARE = 0.25
CUDA_START_PROMPTS = 512
# Below this many rows per thread, handing the noise draw to threads costs more than it saves.
NOISE_ROWS_PER_THREAD = 16


@dataclass(frozen=True)
class ProbeConfig:
    samples: int = field(default=10, metadata={"help": "sampled continuations per template (N_sample)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    max_new_tokens: int = field(default=32, metadata={"help": "maximum tokens per continuation"})
    templates: tuple[int, ...] = field(
        default=(), metadata={"help": "mapping-template indices to use, 0-based (default: all 21)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every sampled continuation"})
    batch_size: int = field(
        default=0, metadata={"help": "prompts per generate call, each expanded to --samples sequences (0 = auto)"}
    )
    stop_at_newline: bool = field(
        default=False,
        metadata={"help": "end a continuation at its first newline (faster; off = the paper's full 32 tokens)"},
    )
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16"})

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be 0 (auto) or positive, got {self.batch_size}")
        if any(t < 0 for t in self.templates) or len(set(self.templates)) != len(self.templates):
            raise ValueError(f"templates must be distinct non-negative indices, got {list(self.templates)}")

    def keyed_settings(self, device: str = "cpu") -> dict:
        """The settings a result depends on: the store key. `auto` dtype is resolved for `device`
        (fp32 on CPU, bf16 on GPU), as the two give different samples."""
        settings = config_to_dict(self)
        for name in UNKEYED_SETTINGS:
            settings.pop(name)
        settings["templates"] = list(self.templates)
        settings["dtype"] = str(parse_dtype(self.dtype, device.split(":")[0])).removeprefix("torch.")
        return settings


# A quick probe for demos on CPU: 5 templates x 4 samples, short continuations ending at a newline.
FAST_PROBE = ProbeConfig(samples=4, templates=(0, 1, 2, 3, 4), max_new_tokens=12, stop_at_newline=True)


def mastery_level(correct: int, total: int) -> int:
    """0 if nothing was correct, else i with R in ((i-1)/4, i/4], in integers (R = 0.25 is level 1)."""
    if total < 1 or not 0 <= correct <= total:
        raise SftlensError(f"invalid probe counts: {correct} correct of {total}")
    return 0 if correct == 0 else -(-4 * correct // total)


@dataclass(frozen=True)
class ProbeRecord:
    fact_id: str
    correct: int
    total: int
    template_correct: tuple[int, ...]
    # Mapping-template index of each entry of template_correct; empty means 0, 1, 2, ...
    template_ids: tuple[int, ...] = ()

    @property
    def R(self) -> float:
        return self.correct / self.total

    @property
    def level(self) -> int:
        return mastery_level(self.correct, self.total)

    def per_template(self) -> dict[int, int]:
        ids = self.template_ids or tuple(range(len(self.template_correct)))
        return dict(zip(ids, self.template_correct))

    def to_row(self) -> dict:
        row = {"fact_id": self.fact_id, "correct": self.correct, "total": self.total,
               "template_correct": list(self.template_correct)}
        if self.template_ids:
            row["template_ids"] = list(self.template_ids)
        return row

    @classmethod
    def from_row(cls, row: dict, where: str) -> "ProbeRecord":
        try:
            record = cls(
                fact_id=str(row["fact_id"]), correct=int(row["correct"]), total=int(row["total"]),
                template_correct=tuple(int(c) for c in row["template_correct"]),
                template_ids=tuple(int(t) for t in row.get("template_ids", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SftlensError(f"{where}: malformed probe record {str(row)[:80]} ({err})") from None
        if sum(record.template_correct) != record.correct or not 0 <= record.correct <= record.total:
            raise SftlensError(f"{where}: inconsistent counts in probe record for {record.fact_id}")
        return record


# --- sampling -------------------------------------------------------------------------------


def sample_seed(seed: int, fact_id: str, template: int, sample: int) -> int:
    """The 64-bit seed of one sampled continuation."""
    return int(stable_hash([seed, fact_id, template, sample]), 16)


class GumbelMaxSampler:
    """Samples from softmax(scores / T) with one `torch.Generator` per sequence (Gumbel-max).

    Every running sequence draws a full row of uniform noise from its own generator at each of its
    steps, whichever other sequences are still running, so its draws follow from its seed alone.
    """

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        noise = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        jobs = list(zip(noise, rows.tolist()))
        # A generator fills its row on one thread; rows are shared out among threads (torch lets go of
        # the GIL inside `uniform_`), which halves the draw's time on two cores. Each row still takes
        # its generator's next values, so threads change no draw.
        parts = min(torch.get_num_threads(), max(1, len(jobs) // NOISE_ROWS_PER_THREAD))
        if parts > 1:
            list(_noise_pool(parts).map(self._fill, [jobs[i::parts] for i in range(parts)]))
        else:
            self._fill(jobs)
        # Gumbel noise -log(-log u); u == 0 gives -inf, which simply never wins.
        noise.log_().neg_().log_().neg_().add_(scores, alpha=1.0 / self.temperature)
        return noise.argmax(dim=-1)

    @torch.inference_mode()  # thread-local: pool threads need it to write the decoder's tensors
    def _fill(self, jobs: list[tuple[torch.Tensor, int]]) -> None:
        for values, row in jobs:
            values.uniform_(generator=self.generators[row])


@functools.lru_cache(maxsize=None)
def _noise_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="sftlens-noise")


class _SampleEnds:
    """Ends a sample at its first newline (with `stop_at_newline`) or as soon as its text contains a
    gold answer: R only asks whether an answer appears within the budget, and containment in the
    normalised text is not undone by text that follows, so the sample is decided."""

    def __init__(self, tokenizer, accepted: list[frozenset[str]], samples: int, stop_at_newline: bool):
        self.tokenizer, self.accepted, self.samples = tokenizer, accepted, samples
        self.stop_at_newline = stop_at_newline

    def __call__(self, rows: list[int], tokens: list[list[int]]) -> list[bool]:
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [(self.stop_at_newline and "\n" in text) or _contains(text, self.accepted[row // self.samples])
                for row, text in zip(rows, texts)]


def _contains(text: str, accepted: frozenset[str]) -> bool:
    normal = normalize(text)
    return any(a in normal for a in accepted)


def generate_samples(lm, tokenizer, prompts: list[list[int]], seeds: list[list[int]], config: ProbeConfig,
                     answers: list[tuple[str, ...]] | None = None) -> list[list[str]]:
    """Continuations of each prompt (token ids, BOS included), one per seed, as text.

    With `answers` (one tuple per prompt), a continuation stops as soon as it contains one of them
    (its text is then that prefix, still correct); without, every continuation runs to its end.
    """
    if any(len(row) != config.samples for row in seeds):
        raise ValueError(f"each prompt needs exactly {config.samples} seeds")
    matcher = default_matcher()
    accepted = [matcher.accepted(a) for a in answers] if answers is not None else [frozenset()] * len(prompts)
    ends = _SampleEnds(tokenizer, accepted, config.samples, config.stop_at_newline)
    sampler = GumbelMaxSampler([s for row in seeds for s in row], config.temperature, lm.device)
    tokens = decode(lm, prompts, max_new_tokens=config.max_new_tokens, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id, choose=sampler, repeats=config.samples,
                    ended=ends if answers is not None or config.stop_at_newline else None)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [texts[i * config.samples:(i + 1) * config.samples] for i in range(len(prompts))]


# --- batch size -----------------------------------------------------------------------------


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def _bytes_per_sequence(lm, prompt_len: int, config: ProbeConfig) -> int:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = torch.finfo(lm.dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * (prompt_len + config.max_new_tokens) * element
    # Scores, noise, softmax and mask buffers over the vocabulary, a few fp32 copies each step.
    scores = 6 * cfg.vocab_size * 4
    return kv + scores


def cpu_batch_size(lm, prompt_len: int, config: ProbeConfig) -> int:
    """Prompts per batch on CPU: as many sequences as pay off, within a share of free memory."""
    by_memory = int(_available_memory() * CPU_MEMORY_SHARE) // _bytes_per_sequence(lm, prompt_len, config)
    return max(1, min(by_memory, CPU_MAX_SEQUENCES) // config.samples)


# --- probing in memory ----------------------------------------------------------------------


def template_indices(facts: Iterable[Fact], config: ProbeConfig) -> tuple[int, ...]:
    """The mapping templates to use, checked against every relation involved."""
    available = min(len(f.relation_templates().mapping_templates) for f in facts)
    chosen = config.templates or tuple(range(available))
    bad = [t for t in chosen if t >= available]
    if bad:
        raise SftlensError(f"template index {bad[0]} out of range: relations have {available} mapping templates (0..{available - 1})")
    return chosen


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def probe_facts(
    lm, tokenizer, facts: list[Fact], config: ProbeConfig, *, batch_size: int | None = None,
    on_record: Callable[[ProbeRecord], None] | None = None, progress: bool = True,
) -> dict[str, ProbeRecord]:
    """Probe `facts` with a loaded model; `on_record` sees each fact as soon as it is complete."""
    if not facts:
        return {}
    template_ids = template_indices(facts, config)
    matcher = default_matcher()
    encoded = {(f.id, t): encode_prompt(tokenizer, f.probe_prompt(t)) for f in facts for t in template_ids}
    if batch_size is None:
        batch_size = config.batch_size or cpu_batch_size(lm, max(map(len, encoded.values())), config)
    facts_per_chunk = max(1, -(-CHUNK_BATCHES * batch_size // len(template_ids)))
    records: dict[str, ProbeRecord] = {}
    bar = tqdm(total=len(encoded) * config.samples, desc=f"probing {len(facts)} facts", unit="sample",
               disable=not progress, smoothing=0.1)
    for chunk in _chunks(facts, facts_per_chunk):
        correct: Counter = Counter()
        # Sorting by length keeps padding low; results do not depend on the order.
        jobs = sorted(((f, t) for f in chunk for t in template_ids), key=lambda job: len(encoded[job[0].id, job[1]]))
        for batch in _chunks(jobs, batch_size):
            seeds = [[sample_seed(config.seed, f.id, t, j) for j in range(config.samples)] for f, t in batch]
            texts = generate_samples(lm, tokenizer, [encoded[f.id, t] for f, t in batch], seeds, config,
                                     answers=[f.accepted_answers for f, _ in batch])
            for (fact, template), outputs in zip(batch, texts):
                correct[fact.id, template] = sum(matcher.is_correct(o, fact.answers, fact.alias_table()) for o in outputs)
            bar.update(len(batch) * config.samples)
        for fact in chunk:
            per_template = tuple(correct[fact.id, t] for t in template_ids)
            record = ProbeRecord(
                fact_id=fact.id, correct=sum(per_template), total=len(template_ids) * config.samples,
                template_correct=per_template,
                template_ids=() if template_ids == tuple(range(len(template_ids))) else template_ids,
            )
            records[fact.id] = record
            if on_record:
                on_record(record)
        bar.set_postfix(facts_done=len(records))
    bar.close()
    return records


# --- the store ------------------------------------------------------------------------------


def store_meta(model: str, fingerprint: str, config: ProbeConfig, device: str = "cpu") -> dict:
    settings = config.keyed_settings(device)
    return {"format": STORE_FORMAT, "model": model, "fingerprint": fingerprint, "settings": settings,
            "key": stable_hash([fingerprint, settings])}


def _open_store(store_dir: Path, meta: dict) -> None:
    meta_path = store_dir / META_FILE
    if meta_path.is_file():
        existing = _read_meta(store_dir)
        if existing.get("key") != meta["key"]:
            raise SftlensError(f"{meta_path}: store was written {_difference(existing, meta)}; use another --store")
        return
    if store_dir.is_dir() and any(store_dir.glob("records-*.jsonl")):
        raise SftlensError(f"{store_dir}: probe records without {META_FILE}; not a probe store")
    atomic_write_json(meta_path, meta)


def _difference(existing: dict, wanted: dict) -> str:
    if existing.get("fingerprint") != wanted["fingerprint"]:
        return f"for another model ({existing.get('model')}, fingerprint {existing.get('fingerprint')})"
    old, new = existing.get("settings", {}), wanted["settings"]
    diffs = [f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "with other settings: " + ", ".join(diffs or ["format"])


def _read_meta(store_dir: Path) -> dict:
    path = store_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SftlensError(f"{path}: cannot read probe store metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise SftlensError(f"{path}: not a probe store of format {STORE_FORMAT}")
    return meta


def _shard_files(store: Path) -> list[Path]:
    return sorted(store.glob("records-*.jsonl")) if store.is_dir() else [store]


def load_probe(store: str | os.PathLike, model: str | None = None, config: ProbeConfig | None = None) -> dict[str, ProbeRecord]:
    """Every record of a probe store (all rank files merged), or of one records file.

    With `model` and `config`, a store written for another model or other settings is an error.
    """
    store = Path(store)
    if not store.exists():
        raise SftlensError(f"{store}: no such probe store")
    if store.is_dir():
        meta = _read_meta(store)
        if model is not None and config is not None:
            wanted = store_meta(model, model_fingerprint(model), config, _device())
            if meta["key"] != wanted["key"]:
                raise SftlensError(f"{store / META_FILE}: store was written {_difference(meta, wanted)}")
    records: dict[str, ProbeRecord] = {}
    for path in _shard_files(store):
        try:
            rows = read_jsonl(path)
        except (OSError, ValueError) as err:
            raise SftlensError(f"{path}: cannot read probe records ({err})") from None
        for row in rows:
            record = ProbeRecord.from_row(row, str(path))
            records.setdefault(record.fact_id, record)
    return records


def _state():
    from accelerate import PartialState

    # Without a GPU, accelerate only forms a process group (gloo) when told it runs on CPU; that
    # is how `torchrun --nproc_per_node N -m sftlens probe` shares work on a CPU machine.
    return PartialState(cpu=not torch.cuda.is_available())


def process_shard() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` or `torchrun`; (0, 1) for a plain process."""
    state = _state()
    return state.process_index, state.num_processes


def _device() -> str:
    return str(_state().device)


def run_probe(
    model: str, facts: list[Fact], config: ProbeConfig, store_dir: str | os.PathLike, progress: bool = True,
    *, shard: tuple[int, int] | None = None, device: str | None = None,
) -> dict[str, ProbeRecord]:
    """Probe `facts` into `store_dir`, skipping facts already there; return the records of `facts`.

    Under `accelerate launch`, rank r of w probes every w-th fact (in id order) and writes its own
    records file; all ranks wait for each other and return the merged records. `shard` sets
    (rank, world) explicitly instead (ranks run one after another then see only finished shards).
    `device` overrides the process's accelerate device (e.g. "cpu" on a GPU machine).
    """
    if not facts:
        raise SftlensError("empty fact selection: nothing to probe")
    config = held_out_templates(model, config)  # an injected model: only the templates it was not taught
    template_indices(facts, config)
    store_dir = Path(store_dir)
    device = device or _device()
    _open_store(store_dir, store_meta(model, model_fingerprint(model), config, device))
    launched = shard is None
    rank, world = process_shard() if launched else shard
    done = load_probe(store_dir)
    ordered = sorted({f.id: f for f in facts}.values(), key=lambda f: f.id)
    mine = [f for i, f in enumerate(ordered) if i % world == rank and f.id not in done]
    if mine:
        lm, tokenizer = load_model(model, dtype=config.dtype, device=device)
        records_file = store_dir / f"records-rank{rank}.jsonl"
        with exclusive_writer(records_file, "probe store"), JsonlAppender(records_file) as log:
            if config.batch_size or lm.device.type != "cuda":
                probe_facts(lm, tokenizer, mine, config, on_record=lambda r: log.write(r.to_row()), progress=progress)
            else:
                _probe_fitting_gpu(lm, tokenizer, mine, config, log, store_dir, progress)
    if launched and world > 1:
        _state().wait_for_everyone()
    records = load_probe(store_dir)
    return {f.id: records[f.id] for f in ordered if f.id in records}


def _probe_fitting_gpu(lm, tokenizer, facts, config, log, store_dir, progress) -> None:
    """On CUDA, start large and let accelerate shrink the batch after an out-of-memory error;
    a retry skips the facts already written, so no work is repeated beyond the failed chunk."""
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=max(1, CUDA_START_PROMPTS // config.samples))
    def attempt(batch_size: int) -> None:
        done = load_probe(store_dir)
        todo = [f for f in facts if f.id not in done]
        probe_facts(lm, tokenizer, todo, config, batch_size=batch_size,
                    on_record=lambda r: log.write(r.to_row()), progress=progress)

    attempt()


# --- summaries ------------------------------------------------------------------------------


def best_templates(records: dict[str, ProbeRecord], facts: Iterable[Fact]) -> dict[str, int]:
    """Per relation, the mapping-template index with the highest success rate (ties: lowest index)."""
    hits: dict[str, Counter] = {}
    for fact in facts:
        record = records.get(fact.id)
        if record is None:
            continue
        counts = hits.setdefault(fact.relation, Counter())
        for template, correct in record.per_template().items():
            counts[template] += correct
    return {rel: min(c, key=lambda t: (-c[t], t)) for rel, c in hits.items() if c}


def _group_of(fact_id: str, domains: dict[str, str] | None = None) -> tuple[str, str]:
    relation, split, _ = parse_fact_id(fact_id)
    domains = domains or {r: t.domain for r, t in load_templates().items()}
    if relation not in domains:
        raise SftlensError(f"probe record {fact_id!r}: unknown relation {relation} (a fact set's: give --facts)")
    return split, domains[relation]


def _group_name(split: str, domain: str) -> str:
    paper = {("train", "in"): "D_train", ("test", "in"): "D_test", ("test", "out"): "D_testood"}
    return paper.get((split, domain), f"D_{split}{'ood' if domain == 'out' else ''}")


_GROUP_ORDER = [("train", "in"), ("dev", "in"), ("test", "in"), ("train", "out"), ("dev", "out"), ("test", "out")]


def level_counts(records: Iterable[ProbeRecord], domains: dict[str, str] | None = None) -> list[dict]:
    """Rows of the paper's Table 1: per set (train, test in-domain, test out-of-domain, and any
    other probed split) the number of facts at each mastery level. `domains`: a fact set's
    (`FactSet.domains()`); default the paper's relations."""
    counts: dict[tuple[str, str], Counter] = {}
    domains = domains or {r: t.domain for r, t in load_templates().items()}
    for record in records:
        counts.setdefault(_group_of(record.fact_id, domains), Counter())[record.level] += 1
    order = [g for g in _GROUP_ORDER if g in counts] + sorted(set(counts) - set(_GROUP_ORDER))
    return [
        {"set": _group_name(*g), "split": g[0], "domain": g[1], **{f"level{i}": counts[g][i] for i in LEVELS},
         "total": sum(counts[g].values())}
        for g in order
    ]


def level_counts_table(records: Iterable[ProbeRecord], fmt: str = "markdown", domains: dict[str, str] | None = None) -> str:
    """The level distribution as a Markdown table or CSV text."""
    rows = level_counts(records, domains)
    columns = ["set", *(f"level{i}" for i in LEVELS), "total"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt != "markdown":
        raise SftlensError(f"unknown table format {fmt!r} (markdown or csv)")
    header = ["set", *(f"level {i}" for i in LEVELS), "total"]
    return markdown_table(header, [[r[c] for c in columns] for r in rows], "l" + "r" * (len(header) - 1)) + "\n"


def write_level_tables(records: Iterable[ProbeRecord], store_dir: Path, domains: dict[str, str] | None = None) -> str:
    records = list(records)
    markdown = level_counts_table(records, domains=domains)
    atomic_write_text(store_dir / "level_counts.md", markdown)
    atomic_write_text(store_dir / "level_counts.csv", level_counts_table(records, "csv", domains))
    return markdown


# --- CLI ------------------------------------------------------------------------------------


def default_store(model: str, config: ProbeConfig) -> Path:
    meta = store_meta(model, model_fingerprint(model), config, _device())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or model).strip("-")
    return Path("sftlens-probes") / f"{slug}-{meta['key'][:12]}"


def _store_from_args(args, config: ProbeConfig) -> Path:
    if args.store:
        return Path(args.store)
    if not args.model:
        raise SftlensError("give --store, or --model (and the probe settings) to find the default store")
    return default_store(args.model, config)


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(ProbeConfig, args)
    if args.action == "stats":
        store = _store_from_args(args, config)
        records = load_probe(store)
        if not records:
            raise SftlensError(f"{store}: no probe records yet")
        domains = fact_set_from_args(args).domains() if args.facts else None
        print(write_level_tables(records.values(), store if store.is_dir() else store.parent, domains), end="")
        return
    if not args.model:
        raise SftlensError("--model is required to probe")
    fact_set, facts = select_from_args(args)
    domains = fact_set.domains() if args.facts else None
    store = _store_from_args(args, config)
    records = run_probe(args.model, facts, config, store)
    if process_shard()[0] != 0:  # under accelerate launch, the main process reports
        return
    print(f"store: {store} ({len(records)} facts of this selection)")
    print(write_level_tables(load_probe(store).values(), store, domains), end="")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe", help="measure the base model's mastery of facts (R_k, levels)",
        description="Probe facts (default action) or print the level table of a store (`probe stats`).",
        epilog="Defaults are the paper's (21 templates x 10 samples, 32 tokens). A quick CPU demo: "
               "--templates 0,1,2,3,4 --samples 4 --max-new-tokens 12 --stop-at-newline (= probe.FAST_PROBE). "
               "Several GPUs: accelerate launch -m sftlens probe ...; several CPU processes: "
               "torchrun --nproc_per_node N -m sftlens probe ...",
    )
    parser.add_argument("action", nargs="?", choices=("run", "stats"), default="run", help="run (default) or stats")
    parser.add_argument("--model", help="built-in name, local folder or hub id")
    add_fact_arguments(parser)
    parser.add_argument("--store", default=None, help="probe store folder (default: sftlens-probes/<model>-<settings key>)")
    add_config_arguments(parser, ProbeConfig)
    parser.set_defaults(func=_run)
