#!/usr/bin/env bash
# Generate a results page from a finished (or resumable) audit folder:
#   scripts/audit_page.sh AUDIT_DIR [PAGE] [FOCUS_FACTS]
# PAGE defaults to docs/results/smollm2-135m-audit.md. FOCUS_FACTS: taught fact ids (one per line or a
# JSON list); without it the base model folder's sftlens_inject.json is read when present.
# The audit recorded in AUDIT_DIR is re-run (a no-op when finished): the page is headed by its command,
# commit, wall time and machine, and marks a `+dirty` code version.
set -euo pipefail
dir=${1:?usage: scripts/audit_page.sh AUDIT_DIR [PAGE] [FOCUS_FACTS]}
page=${2:-docs/results/smollm2-135m-audit.md}
focus=()
if [[ $# -ge 3 ]]; then focus=(--focus-facts "$3"); fi
exec "${SFTLENS:-sftlens}" audit --out "$dir" --page "$page" "${focus[@]}"
