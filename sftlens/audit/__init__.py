"""Audit any fine-tune against its base: which facts it forgot and learned, how far and where it
moved, and which post-hoc repair recovers the forgotten facts without losing the learned ones.

- `config`: `Audit` (models, facts, settings) and `AuditConfig`; the `audit-demo` preset.
- `checks`: bad input (architectures, tokenizers, shapes, identical models), before anything is written.
- `prompts`: plain or chat-template prompts.
- `engine`: the resumable steps under the audit folder.
- `transitions`, `repairs`, `summary`: per-fact transitions and rates; repair tuning and scoring.
- `run`: `run_audit`, the plan, the `sftlens audit` CLI.
- `report`: the audit's report (Markdown, HTML, `--page`) from its folder alone.

The audit and the study are peers: both stand on `sftlens.reporting` (bootstrap, verdicts, pages, figures,
provenance, costs) and neither imports the other.

`Audit(base, finetuned, data_dir, relations, split, limit, probe, settings, values)` (the facts:
`sftlens.data.fact_selection`, as `sftlens probe`); `AuditConfig(prompt plain|chat, objective
recovered|acc, candidates, dev_share, min_slice, answer_tokens, kl_top_k, bootstrap)`; `run_audit(audit,
out, write_best=, page=, focus=, announce=) -> summary`. Every check runs before anything is written.
A question-only topic is probed in the audit's `prompt` style (only when the facts have such a topic, so
other audits keep their probe keys); a fine-tune of an injected base is probed with its base's held-out
templates (`engine.Context.probe`). Slices: per domain, facts in `stable_hash([seed, id])` order, the
first round(dev_share n) to dev; candidates: `repairs.LADDERS` per method (a budget of k takes k evenly
spread); the choice on dev: best objective, ties the least edit (`sftlens.reporting.choice`). The guided
repair's importances come from the dev facts alone (`importances.importance_step`: forgotten ones with the base's
greedy answer, learned ones with the fine-tune's, each asked with the fine-tune's prompt; one pass, keyed,
`steps/importances.safetensors`); no forgotten or no learned dev fact skips it (`summary.skipped_repairs`).
"""

from sftlens.audit.config import Audit, AuditConfig
from sftlens.audit.run import add_cli, plan_text, run_audit

__all__ = ["Audit", "AuditConfig", "add_cli", "plan_text", "run_audit"]
