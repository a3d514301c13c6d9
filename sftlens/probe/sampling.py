"""The seeded sampler (Gumbel-max, one generator per sequence) and probing a list of facts in memory."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from sftlens.data import Fact, available_templates, default_matcher, encode_prompt
from sftlens.data.matching import normalize
from sftlens.data.prompts import chat_prompt
from sftlens.decoding import decode
from sftlens.errors import SftlensError
from sftlens.io import stable_hash
from sftlens.probe.batching import cpu_batch_size
from sftlens.probe.records import ProbeConfig, ProbeRecord

# Facts per unit of resumable work, in multiples of the batch: large enough to sort prompts by
# length (little padding), small enough that a kill loses little.
CHUNK_BATCHES = 4
# Below this many rows per thread, handing the noise draw to threads costs more than it saves.
NOISE_ROWS_PER_THREAD = 16


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


@functools.cache
def _noise_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="sftlens-noise")


class _SampleEnds:
    """Ends a sample at its first newline after some non-blank text (with `stop_at_newline`), or as
    soon as its text contains a gold answer: R only asks whether an answer appears within the budget,
    and containment in the normalised text is not undone by text that follows, so the sample is
    decided. Leading newlines do not end it: a model often opens its answer with one, and stopping
    there would leave every sample empty (mastery level 0 whatever the model knows)."""

    def __init__(self, tokenizer, accepted: list[frozenset[str]], samples: int, stop_at_newline: bool):
        self.tokenizer, self.accepted, self.samples = tokenizer, accepted, samples
        self.stop_at_newline = stop_at_newline

    def __call__(self, rows: list[int], tokens: list[list[int]]) -> list[bool]:
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [(self.stop_at_newline and ended_at_newline(text)) or _contains(text, self.accepted[row // self.samples])
                for row, text in zip(rows, texts)]


def ended_at_newline(text: str) -> bool:
    """The stop-at-newline rule: a newline after the sample's first non-blank text."""
    return "\n" in text.lstrip()


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


def prompt_ids(tokenizer, fact: Fact, template: int, style: str = "plain") -> list[int]:
    """The token ids a fact is probed with: its mapping template filled in (the paper's probe), or for
    a question-only topic its question in `style` (plain: the paper's QA format, `Fact.probe_prompt`;
    chat: the model's chat template, whose text brings its own special tokens)."""
    if style == "chat" and fact.question_only:
        return tokenizer(chat_prompt(tokenizer, fact.question), add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, fact.probe_prompt(template))


def template_indices(facts: Iterable[Fact], config: ProbeConfig) -> tuple[int, ...]:
    """The mapping templates to use, checked against every relation involved."""
    available = available_templates(facts)
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
    encoded = {(f.id, t): prompt_ids(tokenizer, f, t, config.question_prompt) for f in facts for t in template_ids}
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
