"""What an audit is: the two models, the facts (selected exactly as `sftlens probe` selects them),
the probe's settings (`ProbeConfig`) and the audit's own (`AuditConfig`), plus the `audit-demo` preset."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from sftlens.config import config_from_dict, config_to_dict
from sftlens.data import Fact, fact_selection
from sftlens.errors import SftlensError
from sftlens.probe import ProbeConfig

PRESETS = ("audit-demo",)
SELECTION_KEYS = ("data_dir", "facts", "in_domain", "relations", "split", "limit")


@dataclass(frozen=True)
class AuditConfig:
    prompt: Literal["plain", "chat"] = field(
        default="plain", metadata={"help": "plain: the paper's '<question> q <answer>' format; chat: each model's "
                                           "own chat template (the greedy answers and the KL prompts)"})
    objective: Literal["recovered", "acc"] = field(
        default="recovered", metadata={"help": "how a repair value is chosen on dev: recovered = forgotten facts "
                                               "recovered minus learned facts lost; acc = the paper's Acc"})
    candidates: int = field(default=3, metadata={"help": "candidate values per repair method (one budget for all)"})
    dev_share: float = field(default=0.3, metadata={"help": "share of the facts (per domain) in the dev slice"})
    min_slice: int = field(default=10, metadata={"help": "fewest facts the dev and the test slice may have"})
    answer_tokens: int = field(default=16, metadata={"help": "longest greedy answer, in tokens"})
    kl_top_k: int = field(default=10, metadata={"help": "first-token KL over the fine-tune's top-k logits"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of every interval"})

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if not 0 < self.dev_share < 1:
            raise ValueError(f"dev_share must be in (0, 1), got {self.dev_share}")
        for name in ("min_slice", "answer_tokens", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kl_top_k < 2:
            raise ValueError(f"kl_top_k must be at least 2, got {self.kl_top_k}")


@dataclass(frozen=True)
class Audit:
    """One audit: models, fact selection, probe and audit settings, and explicit candidate values
    per repair method (`values`: method -> values; the others get the default candidates)."""

    base: str
    finetuned: str
    data_dir: str | None = None
    facts: str | None = None  # a fact set (`sftlens data import` folder or native JSONL) instead of data_dir
    in_domain: str | None = None  # with facts: the topics that count as in-domain
    relations: str = "all"
    split: str = "test"
    limit: int | None = None
    probe: ProbeConfig = ProbeConfig()
    settings: AuditConfig = AuditConfig()
    values: tuple[tuple[str, tuple[str | float, ...]], ...] = ()

    def selected_facts(self) -> list[Fact]:
        """The facts, exactly as `sftlens probe` selects them (--data-dir or --facts, --relations,
        --split, --limit: `sftlens.data.fact_selection`)."""
        return fact_selection(**{k: getattr(self, k) for k in SELECTION_KEYS})[1]

    def to_dict(self) -> dict:
        return {"base": self.base, "finetuned": self.finetuned, **{k: getattr(self, k) for k in SELECTION_KEYS},
                "probe": config_to_dict(self.probe), "settings": config_to_dict(self.settings),
                "values": {m: list(v) for m, v in self.values}}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Audit:
        try:
            return cls(base=data["base"], finetuned=data["finetuned"], **{k: data.get(k) for k in SELECTION_KEYS
                                                                           if data.get(k) is not None},
                       probe=config_from_dict(ProbeConfig, data.get("probe", {}), f"{where} probe"),
                       settings=config_from_dict(AuditConfig, data.get("settings", {}), f"{where} settings"),
                       values=tuple((m, tuple(v)) for m, v in sorted(data.get("values", {}).items())))
        except (KeyError, TypeError) as err:
            raise SftlensError(f"{where}: not an audit record ({err})") from None


def preset(name: str) -> dict:
    """A preset's settings: `selection` (data keys), `probe` and `audit` tables."""
    if name not in PRESETS:
        raise SftlensError(f"unknown audit preset {name!r} (known: {', '.join(PRESETS)})")
    text = resources.files("sftlens.resources").joinpath("presets", f"{name}.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    unknown = sorted(set(data) - {"selection", "probe", "audit"})
    if unknown:
        raise SftlensError(f"preset {name}: unknown table [{unknown[0]}]")
    config_from_dict(ProbeConfig, data.get("probe", {}), f"{name} [probe]")
    config_from_dict(AuditConfig, data.get("audit", {}), f"{name} [audit]")
    bad = sorted(set(data.get("selection", {})) - set(SELECTION_KEYS))
    if bad:
        raise SftlensError(f"preset {name}: unknown setting selection.{bad[0]}")
    return data
