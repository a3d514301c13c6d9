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
"""

from sftlens.audit.config import Audit, AuditConfig
from sftlens.audit.run import add_cli, plan_text, run_audit

__all__ = ["Audit", "AuditConfig", "add_cli", "plan_text", "run_audit"]
