"""What each training-time guard costs: `sftlens train` with each guard of `sftlens.guards` against plain SFT
(the baseline), in the same process, on the same SFT rows.

Each run loads SmolLM2-135M in fp32 on the CPU, trains one epoch at batch 8 and saves the model folder; every
guard runs at a value inside its range (replay at 0.25 of each batch, so its run reads 4/3 the examples).
Reported per run: wall seconds (load + train + save), the training loop's seconds (`train_seconds` of the run
record), both relative to plain SFT, and the memory the guard declares it holds beyond plain SFT (the process's
resident memory keeps what earlier runs freed, so it cannot tell one run's peak). Runs alternate plain / guard
so that drift in the machine's load hits both. Run it alone on a quiet machine; `uptime` is printed before and after.

    python bench/guard_cost.py                 # 64 examples (8 steps) per run: ~3 min on 2 idle cores
    python bench/guard_cost.py --examples 240
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sftlens.data import in_domain_relations, load_facts
from sftlens.data.rows import split_row
from sftlens.guards import GUARDS, known_rows
from sftlens.io import atomic_write_jsonl
from sftlens.models import RUN_FILE
from sftlens.probe import ProbeRecord
from sftlens.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "entityquestions"
VALUES = {"replay": 0.25, "l2": 1.0, "kl": 1.0, "freeze": 0.5, "mofo": 0.2}


def one_run(rows_file: Path, out: Path, guard: str | None, replay: list[dict] | None) -> dict:
    started = time.perf_counter()
    folder = train("smollm2-135m", rows_file, out, TrainConfig(learning_rate=1e-4, guard=guard), progress=False,
                   replay=replay)
    record = json.loads((folder / RUN_FILE).read_text())
    return {"guard": guard or "plain", "wall_s": time.perf_counter() - started,
            "train_s": record["train_seconds"], "steps": record["steps"],
            "declared_extra_mb": record.get("guard", {}).get("extra_bytes", 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--data-dir", default=os.environ.get("SFTLENS_DATA_DIR", str(DEFAULT_DATA)))
    args = parser.parse_args()
    facts = [f for f in load_facts(args.data_dir, splits=("train",), relations=in_domain_relations()).facts]
    sft = [split_row(f, 0) for f in facts[:args.examples]]
    # replay's pool: the next facts, standing in for a probe's level-4 ones (the cost does not depend on which)
    pool_facts = facts[args.examples:args.examples + 64]
    pool = known_rows({f.id: ProbeRecord(f.id, 4, 4, ()) for f in pool_facts}, pool_facts)
    print("load average before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "sft.jsonl"
        atomic_write_jsonl(rows_file, sft)
        for name in GUARDS:
            spec = f"{name}={VALUES[name]}"
            plain = one_run(rows_file, Path(tmp) / f"plain-{name}", None, None)
            guarded = one_run(rows_file, Path(tmp) / name, spec, pool if name == "replay" else None)
            rows += [plain, {**guarded, "guard": spec, "wall_vs_plain": guarded["wall_s"] / plain["wall_s"],
                             "train_vs_plain": guarded["train_s"] / plain["train_s"]}]
            print(json.dumps(rows[-1]), flush=True)
    plain_train = statistics.fmean(r["train_s"] for r in rows if r["guard"] == "plain")
    print(f"\n{args.examples} examples, batch 8; plain SFT train loop {plain_train:.1f} s (mean of {len(GUARDS)} runs)")
    print("| guard | steps | train loop vs plain (same pair) | wall vs plain | declared extra memory |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["guard"] != "plain":
            print(f"| {r['guard']} | {r['steps']} | {r['train_vs_plain']:.2f}x | {r['wall_vs_plain']:.2f}x | "
                  f"{r['declared_extra_mb']:.0f} MB |")
    print("load average after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
