"""Loading and validating a large fact set: time and peak memory against the issue's budget
(1 M facts in <= 30 s and <= 2 GB), and that appending lines changes no fact id.

The set is generated: a third of the facts PopQA-like (subject + relation with templates in the
side file, one answer with aliases), a third TriviaQA-like (question-only, aliases, ids), a third
with several answers and no id (ids from content, splits from the key). The load runs in a fresh
child process, so its peak RSS is the loader's alone. The budget is judged on the loader's CPU time
(its wall time on an idle core: the loader is one thread); wall time and load average are printed too.

    python bench/factset_load.py                      # 1 M facts (the budget)
    python bench/factset_load.py --facts 100000       # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BUDGET_S, BUDGET_GB, BUDGET_FACTS = 30.0, 2.0, 1_000_000
RELATIONS = 40

CHILD = """
import json, resource, sys, time
from sftlens.data import load_fact_set
start, cpu = time.perf_counter(), time.process_time()
facts = load_fact_set(sys.argv[1])
elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
ids = [f.id for f in facts.facts[:int(sys.argv[2])]] if len(sys.argv) > 2 else []
print(json.dumps({"facts": len(facts.facts), "seconds": elapsed, "cpu_seconds": cpu, "ids": ids,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def fact_line(i: int) -> dict:
    kind = i % 3
    if kind == 0:
        return {"subject": f"Entity number {i}", "relation": f"R{i % RELATIONS}",
                "answers": [{"answer": f"Object {i % 997}", "aliases": [f"Obj {i % 997}", f"O-{i % 997}"]}],
                "id": str(i)}
    if kind == 1:
        return {"question": f"Which trivia answer belongs to question number {i}?", "topic": f"T{i % 7}",
                "answers": [{"answer": f"Answer {i}", "aliases": [f"answer {i}", f"the answer {i}"]}],
                "id": f"tq_{i}"}
    return {"question": f"What are the values of item {i}?", "topic": "multi",
            "answers": [f"value {i}", f"value {i + 1}", f"value {i + 2}"], "domain": "out"}


def write_set(path: Path, n: int, start: int = 0, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps(fact_line(i)) + "\n")
    relations = {f"R{r}": {"question": "Which object belongs to {subject}?",
                           "templates": [f"The object of {{subject}} (relation {r}) is", "{subject} has the object"]}
                 for r in range(RELATIONS)}
    path.with_name(path.stem + ".relations.json").write_text(json.dumps({"relations": relations}))


def load_in_child(path: Path, first_ids: int = 0) -> dict:
    args = [sys.executable, "-c", CHILD, str(path), *([str(first_ids)] if first_ids else [])]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=BUDGET_FACTS, help="facts to generate and load")
    parser.add_argument("--append", type=int, default=1000, help="lines appended for the id check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        write_set(path, args.facts)
        size_mb = path.stat().st_size / 2**20
        first = load_in_child(path, first_ids=args.facts)
        write_set(path, args.append, start=args.facts, mode="a")
        after = load_in_child(path, first_ids=args.facts)
    same = after["ids"] == first["ids"] and after["facts"] == first["facts"] + args.append
    scale = BUDGET_FACTS / args.facts
    print(f"{first['facts']} facts ({size_mb:.0f} MiB): {first['cpu_seconds']:.1f} s CPU ({first['seconds']:.1f} s "
          f"wall, load average {os.getloadavg()[0]:.1f}), peak RSS {first['peak_rss_gb']:.2f} GB")
    if scale != 1:
        print(f"scaled to {BUDGET_FACTS} facts (linear): {first['cpu_seconds'] * scale:.1f} s CPU, "
              f"{first['peak_rss_gb'] * scale:.2f} GB (budget {BUDGET_S:.0f} s, {BUDGET_GB:.0f} GB)")
    print(f"ids unchanged after appending {args.append} lines: {same}")
    within = first["cpu_seconds"] * scale <= BUDGET_S and first["peak_rss_gb"] * scale <= BUDGET_GB
    print("within budget" if within and same else "OUT OF BUDGET")


if __name__ == "__main__":
    main()
