"""`sftlens demo`: what sftlens is for, in a few minutes on a CPU, on the embedded SmolLM2-135M.

1. Teach the model facts it did not know (`sftlens inject`: a share of the first test facts of every relation,
   in statement form, mapping templates 0-9), so that it has knowledge a fine-tune can take away.
2. Fine-tune that taught model with the paper's QA SFT (Appendix A's format, batch 8, one epoch) on other facts:
   the first in-domain training facts of every relation, which it was not taught.
3. Audit the pair (`sftlens audit`) on the test facts, probing on held-out templates 10 and 11: which facts the
   fine-tune forgot and learned, and which post-hoc repair brings the forgotten back at what cost.
4. Say it in a few lines, every number from this run, and where the report is.

Each step is keyed and resumable, so a second `sftlens demo` reuses what the first made. The paper's own demo
study (probe, split, SFT grid, evaluation, report) is `sftlens study run demo`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.config import add_config_arguments, config_from_args
from sftlens.data import first_per_relation, in_domain_relations, load_facts
from sftlens.data.rows import split_row
from sftlens.io import atomic_write_jsonl
from sftlens.taught import taught_facts

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class DemoConfig:
    facts_per_relation: int = field(default=8, metadata={"help": "test facts per relation audited (24 relations)"})
    taught_share: float = field(default=0.5, metadata={"help": "share of them taught to the model first"})
    sft_facts_per_relation: int = field(default=20, metadata={"help": "in-domain training facts per relation of "
                                                                      "the QA fine-tune (12 relations)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "the QA fine-tune's learning rate"})

    def __post_init__(self):
        if self.facts_per_relation < 1 or self.sft_facts_per_relation < 1:
            raise ValueError("facts_per_relation and sft_facts_per_relation must be at least 1")
        if not 0 < self.taught_share <= 1:
            raise ValueError(f"taught_share must be in (0, 1], got {self.taught_share}")


def run_demo(out: Path, data_dir: str | None, config: DemoConfig = DemoConfig(), progress: bool = True,
             say=print, model: str = MODEL) -> dict:
    """The three steps under `out` (taught/, qa-sft.jsonl, finetuned/, audit/) on `model`; returns the audit's
    summary and the closing lines (`story`)."""
    from sftlens.audit import Audit, AuditConfig, run_audit
    from sftlens.inject import InjectConfig, inject
    from sftlens.probe import ProbeConfig
    from sftlens.train import TrainConfig, train

    out, start = Path(out), time.perf_counter()
    facts = first_per_relation(load_facts(data_dir, splits=("test",)).facts, config.facts_per_relation)
    say(f"1/3 teaching {model} {config.taught_share:.0%} of {len(facts)} test facts (statements, templates 0-9)")
    taught = inject(model, facts, out / "taught", InjectConfig(templates=tuple(range(10)), doses=(1, 2, 4),
                                                               share=config.taught_share), progress=progress)
    sft = first_per_relation(load_facts(data_dir, splits=("train",), relations=in_domain_relations()).facts,
                             config.sft_facts_per_relation)
    rows = out / "qa-sft.jsonl"
    atomic_write_jsonl(rows, [split_row(f, 0) for f in sft])
    say(f"2/3 QA fine-tune of the taught model on {len(sft)} other facts (lr {config.learning_rate:g}, batch 8)")
    finetuned = train(str(taught), rows, out / "finetuned", TrainConfig(learning_rate=config.learning_rate),
                      progress=progress)
    say(f"3/3 auditing the pair on the {len(facts)} test facts, with every repair method")
    audit = Audit(base=str(taught), finetuned=str(finetuned), data_dir=data_dir, split="test",
                  limit=config.facts_per_relation,
                  probe=ProbeConfig(samples=2, templates=(10, 11), max_new_tokens=16, stop_at_newline=True),
                  settings=AuditConfig(answer_tokens=16))
    summary = run_audit(audit, out / "audit", progress=progress, command="sftlens demo")
    lines = story(out / "audit", summary, taught_facts(taught))
    for line in lines:
        say(line)
    say(f"({(time.perf_counter() - start) / 60:.1f} min)")
    return {**summary, "story": lines}


def _interval(estimate: dict) -> str:
    return f"{100 * estimate['value']:.0f} % [95 % CI {100 * estimate['low']:.0f}, {100 * estimate['high']:.0f}]"


def story(audit_dir: Path, summary: dict, taught: frozenset[str]) -> list[str]:
    """The closing lines: what the fine-tune forgot of the taught facts, what it learned, the best repair."""
    import numpy as np

    from sftlens.audit.summary import best_repair
    from sftlens.audit.transitions import ratio_estimate

    rows = [json.loads(line) for line in (audit_dir / "facts.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["fact_id"] in taught]
    base = np.array([r["base_correct"] for r in mine], dtype=bool)
    tuned = np.array([r["finetuned_correct"] for r in mine], dtype=bool)
    forgot = ratio_estimate(base & ~tuned, base, 1000, 0)
    overall = summary["all"]
    lines = [f"The taught model answered {int(base.sum())} of the {len(mine)} taught facts right; after the QA "
             f"fine-tune it forgot {int((base & ~tuned).sum())} of them: "
             + (_interval({"value": forgot.value, "low": forgot.low, "high": forgot.high}) if forgot else "n/a") + ".",
             f"Over all {overall['n']} audited facts it forgot {overall['forgotten']} and learned {overall['learned']}"
             f" (exact McNemar p = {overall['mcnemar_p']:.2g})."]
    if summary.get("repairs"):
        method = best_repair(summary["repairs"])
        chosen, test = summary["repairs"][method]["chosen"], summary["repairs"][method]["test"]
        recovered, kept = test["recovered"], test["learned_kept"]
        lines.append(f"Best repair, chosen on the dev facts: {method} at {chosen:g}; on the held-out facts it brought "
                     f"back {_interval(recovered) if recovered else 'none'} of {test['forgotten_n']} forgotten facts "
                     f"and kept {_interval(kept) if kept else 'none'} of {test['learned_n']} learned ones.")
    lines.append(f"Report: {summary['report']['html']}")
    return lines


def _run(args: argparse.Namespace) -> None:
    run_demo(Path(args.out), args.data_dir, config_from_args(DemoConfig, args), progress=not args.quiet,
             model=args.model)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="a few minutes on a CPU: teach SmolLM2 facts, fine-tune it, audit "
                                                "what it forgot and which repair brings it back")
    parser.add_argument("--out", default="runs/demo", help="folder of the demo's models and audit (default: runs/demo)")
    parser.add_argument("--data-dir", help="EntityQuestions folder (default: $SFTLENS_DATA_DIR)")
    parser.add_argument("--model", default=MODEL, help=f"the model taught and fine-tuned (default: {MODEL})")
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(func=_run, writes="out")
