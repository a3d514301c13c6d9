#!/usr/bin/env bash
# The audit page of the knowledge testbed, end to end, on the embedded SmolLM2-135M:
#   1. teach it a quarter of 42 test facts per relation (1,008 facts, all 24 relations) in statement form
#      (`sftlens inject`, mapping templates 0-9, graded doses), so that it has facts to forget;
#   2. fine-tune that taught model on 960 OTHER facts (in-domain train split, the paper's QA format) with
#      a plain transformers.Trainer script that imports nothing from sftlens (an outside fine-tune);
#   3. audit the pair on the 1,008 facts, probing on held-out templates 10 and 11 (2 samples each), with
#      every repair method, and write docs/results/smollm2-135m-audit.md.
# Every step is keyed or checked and skips finished work, so the script resumes where it stopped.
#   scripts/testbed_audit.sh [DATA_DIR] [RUN_DIR]
set -euo pipefail
data=${1:-../shared/data/entityquestions}
runs=${2:-runs/testbed}
bin=${VENV:-.venv}/bin
export SFTLENS_DATA_DIR=$data OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$runs"

"$bin/sftlens" inject --model smollm2-135m --relations all --split test --limit 42 --share 0.25 \
  --out "$runs/taught"

if [[ ! -f "$runs/qa-train.jsonl" ]]; then
  "$bin/python" - "$data" "$runs/qa-train.jsonl" <<'EOF'
import json, sys
from sftlens.data import first_per_relation, load_facts, sft_completion, sft_prompt
facts = first_per_relation(load_facts(sys.argv[1], relations="in", splits=("train",)).facts, 96)
with open(sys.argv[2] + ".tmp", "w") as out:
    for fact in facts:
        out.write(json.dumps({"prompt": sft_prompt(fact.question), "completion": sft_completion(fact.answers[0])}) + "\n")
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
print(f"{sys.argv[2]}: {len(facts)} QA rows")
EOF
fi

if [[ ! -f "$runs/qa-ft/finetune.json" ]]; then
  "$bin/python" scripts/trainer_qa_finetune.py --model "$runs/taught" --data "$runs/qa-train.jsonl" \
    --out "$runs/qa-ft" --learning-rate 1e-4 --epochs 1 --batch-size 8 --seed 0
fi

"$bin/sftlens" audit --base "$runs/taught" --finetuned "$runs/qa-ft" --out "$runs/audit" \
  --relations all --split test --limit 42 --templates 10,11 --samples 2 --max-new-tokens 16 \
  --stop-at-newline --page docs/results/smollm2-135m-audit.md
