"""Audit throughput: `sftlens audit` on a base/fine-tune pair against the naive baseline, in one run.

The audit (probe both models, greedy answers, KL, update concentration, every repair method swept on
dev and scored on test) is timed end to end with its peak RSS beyond the two models, and each step's
measured seconds stand beside the plan's estimate made before it ran (`sftlens audit --plan`). The baseline
answers the same facts the naive way, one `generate` call per fact and model (greedy, the same
prompts and token budget), and must give the same answers. By default the pair is the embedded
SmolLM2-135M and a fine-tune made here on 60 training facts (about half a minute).

    python bench/audit_pair.py --facts-per-relation 42          # 1,008 facts: the target (<= 5 min, 2 cores)
    python bench/audit_pair.py --facts-per-relation 1           # a smoke run (a few minutes)
    python bench/audit_pair.py --skip-baseline                  # the audit's time and memory only
    python bench/audit_pair.py --base B --finetuned F ...       # any pair
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sftlens.audit import Audit, AuditConfig, run_audit  # noqa: E402
from sftlens.audit.engine import prepare  # noqa: E402
from sftlens.audit.run import plan_rows  # noqa: E402
from sftlens.data import encode_prompt  # noqa: E402
from sftlens.io import read_jsonl  # noqa: E402
from sftlens.models import load_model  # noqa: E402
from sftlens.probe import ProbeConfig  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "entityquestions"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fine_tune_here(data_dir: Path, work: Path) -> str:
    sys.path.insert(0, str(REPO / "bench"))
    from eval_throughput import fine_tuned

    return fine_tuned(data_dir, 60, work)


def fine_tune(data_dir: Path, work: Path) -> str:
    """The default fine-tune, made in a child process: training's memory must not enter this process's
    peak RSS (a high-water mark), which is the audit's measurement."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fine_tune_here, data_dir, work).result()


def naive_answers(model_dir: str, rows: list[dict], key: str, tokens: int) -> tuple[dict, float]:
    """One `generate` call per fact: the baseline."""
    model, tokenizer = load_model(model_dir, dtype="fp32", device="cpu")
    start = time.perf_counter()
    out = {}
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([encode_prompt(tokenizer, row[key])])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            out[row["fact_id"]] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--finetuned", help="default: SmolLM2-135M fine-tuned here on 60 facts")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--facts-per-relation", type=int, default=42, help="42 x 24 relations = 1,008 test facts")
    parser.add_argument("--out", help="audit folder (default: a temporary one)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="time and measure the audit only (the naive baseline takes longer than the audit)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        finetuned = args.finetuned or fine_tune(Path(args.data_dir), work)
        audit = Audit(args.base, finetuned, data_dir=args.data_dir, limit=args.facts_per_relation,
                      probe=ProbeConfig(samples=2, templates=(0, 1), max_new_tokens=8, stop_at_newline=True),
                      settings=AuditConfig(answer_tokens=16, min_slice=5))
        out = Path(args.out or work / "audit")
        # the plan's estimate before anything runs (`--plan`), against the steps' measured seconds after
        planned = {step: seconds for step, _, _, seconds in plan_rows(prepare(audit, out, progress=False))}
        before = rss_mb()
        start = time.perf_counter()
        summary = run_audit(audit, out, progress=False)
        wall = time.perf_counter() - start
        peak = rss_mb()
        rows = read_jsonl(out / "facts.jsonl")
        record = json.loads((out / "audit.json").read_text())
        folders, measured = record["folders"], record["sessions"][-1]["steps"]
        model_mb = sum(f.stat().st_size for role in folders for f in Path(folders[role]).glob("*.safetensors")) / 2**20
        naive, naive_s = {}, 0.0
        for role, key in () if args.skip_baseline else (("base", "base_prompt"), ("finetuned", "finetuned_prompt")):
            answers, seconds = naive_answers(folders[role], rows, key, 16)
            naive[role], naive_s = answers, naive_s + seconds
        same = all(naive[role][r["fact_id"]] == r[f"{role}_answer"] for r in rows for role in naive) if naive else None
        print(json.dumps({
            "facts": summary["facts"], "audit_wall_s": round(wall, 1),
            "audit_peak_rss_mb": round(peak), "rss_before_audit_mb": round(before), "two_models_mb": round(model_mb),
            "peak_beyond_two_models_mb": round(peak - before - model_mb),
            "naive_generate_greedy_only_s": round(naive_s, 1), "naive_answers_identical": same,
            "cpu_threads": torch.get_num_threads(),
            "plan_s": round(sum(planned.values()), 1), "plan_vs_wall": round(sum(planned.values()) / wall, 2),
            "steps": {step: {"measured_s": measured.get(step, 0.0), "planned_s": round(planned[step], 1)}
                      for step in planned},
        }, indent=2))


if __name__ == "__main__":
    main()
