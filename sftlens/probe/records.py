"""Mastery records and levels (paper Section 3.1): the probe's settings, one fact's counts and the
level they give.

`ProbeRecord(fact_id, correct, total, template_correct, template_ids)`, `.R`, `.level`; `template_ids`
(an optional 5th field of a store line) names the mapping templates when `ProbeConfig.templates` is a
subset. `mastery_level(correct, total)`: 0 if correct == 0, else ceil(4 * correct / total) in integers.
`ProbeConfig` holds the paper's defaults (samples 10, temperature 0.7, max_new_tokens 32, all templates,
seed 0); `keyed_settings` is the store key's part (`batch_size` is not keyed; `question_prompt` enters only
when chat); `FAST_PROBE` is a CPU demo preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sftlens.config import NOT_KEYED, keyed_dict
from sftlens.errors import SftlensError
from sftlens.models import parse_dtype

LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class ProbeConfig:
    samples: int = field(default=10, metadata={"help": "sampled continuations per template (N_sample)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    max_new_tokens: int = field(default=32, metadata={"help": "maximum tokens per continuation"})
    templates: tuple[int, ...] = field(
        default=(), metadata={"help": "mapping-template indices to use, 0-based (default: all 21)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every sampled continuation"})
    # Not keyed: no sample depends on the batch size.
    batch_size: int = field(
        default=0, metadata={"help": "prompts per generate call, each expanded to --samples sequences (0 = auto)",
                             **NOT_KEYED}
    )
    stop_at_newline: bool = field(
        default=False,
        metadata={"help": "end a continuation at its first newline after some text (faster; off = the paper's "
                          "full 32 tokens)"},
    )
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16"})
    # Left out of every key at its default, so the keys of probes and study units from before it stay.
    question_prompt: Literal["plain", "chat"] = field(
        default="plain", metadata={"omit_if_default": True, "help": (
            "how a question-only topic (no mapping templates) asks its question: plain = the paper's "
            "'<question> q <answer>' format, chat = the model's chat template (mapping templates are filled in as "
            "the paper's)")})

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be 0 (auto) or positive, got {self.batch_size}")
        if self.question_prompt not in ("plain", "chat"):
            raise ValueError(f"question_prompt must be plain or chat, got {self.question_prompt!r}")
        if any(t < 0 for t in self.templates) or len(set(self.templates)) != len(self.templates):
            raise ValueError(f"templates must be distinct non-negative indices, got {list(self.templates)}")

    def keyed_settings(self, device: str = "cpu") -> dict:
        """The settings a result depends on: the store key. `auto` dtype is resolved for `device`
        (fp32 on CPU, bf16 on GPU), as the two give different samples."""
        settings = keyed_dict(self)
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
    def from_row(cls, row: dict, where: str) -> ProbeRecord:
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
