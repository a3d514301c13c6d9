"""Every repair method's sweep versus mergekit's single-model DARE / TIES, on synthetic checkpoints.

On the sharded bf16 checkpoints of `bench/restore_scaling.py` (same builder, same concentrated
update), each measurement runs in its own subprocess under RLIMIT_AS = `--limit-gb` and reports
wall time, CPU time and peak RSS (VmHWM):

  ours      `sftlens.weights.repair_sweep`, one process per method, a sweep of 5 values written as
            5 HF folders (restore: the paper's settings, region body; wise/dare/trim: region all,
            as mergekit edits every tensor);
  mergekit  `run_merge` with one model + base, doing ONE value (PyPI `mergekit`, in the interpreter
            of `--mergekit-python`): `ties` with density d / 100 (sign election and disjoint mean
            are no-ops for one model, so this is our `trim` at d, per tensor), and `dare_linear`
            with density 1 - p, computing in fp32 (`dtype: float32`, `out_dtype: bfloat16`).

Checks where the operation is deterministic: trim at d against mergekit's ties at d / 100,
element for element; elements that differ must all be tied at the threshold (mergekit's argsort
breaks ties arbitrarily, ours by flat index). DARE masks come from different generators, so only
the kept share of the layers' changed elements is compared (mergekit 0.1.5 rescales the kept
delta to the L1 norm of the whole delta, 1 / (1 - p) only in expectation; ours by exactly 1 / (1 - p)).

Targets, printed as ratios: peak RSS < 1.5 GB at 6 GB per model for every method; each sweep at
least as fast (wall) as mergekit doing one value.

    python bench/repair_scaling.py                 # 0.5 and 6 GB per model (needs ~60 GB of disk)
    python bench/repair_scaling.py --sizes 0.05    # a quick check
Without mergekit the bench still runs and prints "mergekit not installed" in its columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restore_scaling import _usage, build_checkpoints, run_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SWEEPS = {
    "restore": (1.0, 5.0, 10.0, 20.0, 40.0),
    "wise": (0.2, 0.4, 0.6, 0.8, 0.9),
    "dare": (0.1, 0.3, 0.5, 0.7, 0.9),
    "trim": (10.0, 20.0, 40.0, 60.0, 80.0),
}
# mergekit's one value: (merge method, density), and the value of our sweep it corresponds to
MERGEKIT = {"trim": ("ties", 0.2, 20.0), "dare": ("dare_linear", 0.5, 0.5)}
RSS_TARGET_GB = 1.5
NOT_INSTALLED = "mergekit not installed"


def _timed(start: float) -> dict:
    return {"seconds": time.perf_counter() - start, **_usage()}


# --- workers (run in subprocesses) ----------------------------------------------------------

def worker_ours(method: str, base: str, ft: str, out: str) -> dict:
    sys.path.insert(0, str(REPO))  # this checkout's sftlens, not an installed one
    from sftlens.weights import RepairConfig, repair_sweep

    start = time.perf_counter()
    config = RepairConfig(method=method, region="body" if method == "restore" else "all")
    folders = repair_sweep(base, ft, SWEEPS[method], config, out, progress=False)
    manifest = next(iter(folders.values())) / ("restore.json" if method == "restore" else "repair.json")
    return {**_timed(start), "passes": json.loads(manifest.read_text())["passes"]}


def worker_mergekit(merge_method: str, density: str, base: str, ft: str, out: str) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    start = time.perf_counter()
    config = MergeConfiguration.model_validate({
        "merge_method": merge_method, "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": ft, "parameters": {"density": float(density), "weight": 1.0}}],
    })
    run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0, quiet=True))
    return _timed(start)


# --- checks -----------------------------------------------------------------------------------

def _tensors(folder: Path):
    """(name, tensor) of every tensor of a safetensors folder, one at a time."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _reader(folder: Path):
    from safetensors import safe_open

    where = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            where.update(dict.fromkeys(f.keys(), shard))

    def read(name: str) -> torch.Tensor:
        with safe_open(where[name], "pt") as f:
            return f.get_tensor(name)

    return read


def compare_trim(ours: Path, theirs: Path, base: Path, ft: Path) -> str:
    """Elements where our trim and mergekit's ties differ, and whether each tensor's are one tie group."""
    read_theirs, read_base, read_ft = _reader(theirs), _reader(base), _reader(ft)
    differing, tensors, all_ties = 0, 0, True
    for name, mine in _tensors(ours):
        other = read_theirs(name)
        diff = mine != other
        if diff.any():
            tensors += 1
            differing += int(diff.sum())
            delta = (read_ft(name).float() - read_base(name).float()).abs()
            all_ties &= len(delta[diff].unique()) == 1
    if not differing:
        return "identical"
    verdict = "all tied at the threshold" if all_ties else "NOT only ties: the selections differ"
    return f"{differing:,} elements differ in {tensors} tensors, {verdict}"


def kept_share(folder: Path, base: Path, ft: Path) -> float:
    """Share of the changed elements of the layers whose update was kept (not reset to base).
    Layers only: mergekit merges the input embeddings its own way (a higher kept share)."""
    read_base, read_ft = _reader(base), _reader(ft)
    kept = changed = 0
    for name, edited in _tensors(folder):
        if ".layers." not in name:
            continue
        b = read_base(name)
        moved = read_ft(name) != b
        changed += int(moved.sum())
        kept += int((moved & (edited != b)).sum())
    return kept / max(changed, 1)


def _mergekit_config(folder: Path) -> None:
    """mergekit needs the architecture and Llama's head counts in config.json (idempotent)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    hidden = config["hidden_size"]
    config.update(architectures=["LlamaForCausalLM"], intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                  num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    path.write_text(json.dumps(config))


def mergekit_python(explicit: str | None) -> str | None:
    """An interpreter that can import mergekit: --mergekit-python, this one, or /work/mk's."""
    for python in ([explicit] if explicit else [sys.executable, os.environ.get("MERGEKIT_PYTHON", "/work/mk/bin/python")]):
        if python and Path(python).exists() and subprocess.run(
                [python, "-c", "import mergekit.merge"], capture_output=True).returncode == 0:
            return python
    return None


# --- the run --------------------------------------------------------------------------------

def _cell(result: dict) -> str:
    if not result["ok"]:
        return f"FAILED at {result['failed_at']}: {result['error']}"
    return f"{result['wall']:.1f}s / {result['cpu']:.1f}s / {result['peak_rss_gb']:.2f} GB"


def measure(gb: float, root: Path, args, python: str | None) -> list[list[str]]:
    base, ft = build_checkpoints(root / "inputs", gb, args.shard_mb)
    for folder in (base, ft):
        _mergekit_config(folder)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    print(f"\n{gb:g} GB: checkpoints of {size:.2f} GB per model, {len(list(base.glob('*.safetensors')))} shards, "
          f"{os.cpu_count()} CPUs, RLIMIT_AS {args.limit_gb:g} GB per worker", flush=True)
    rows = []
    for method in args.methods:
        out = root / f"ours-{method}"
        shutil.rmtree(out, ignore_errors=True)
        ours = run_worker(["ours", method, str(base), str(ft), str(out)], args.limit_gb, __file__)
        rss = f"{ours['peak_rss_gb'] / RSS_TARGET_GB:.2f}" if ours["ok"] else "-"
        theirs_cell, speed, check = (NOT_INSTALLED,) * 3 if method in MERGEKIT else ("-",) * 3
        if method in MERGEKIT and python:
            merge_method, density, value = MERGEKIT[method]
            theirs_out = root / f"mergekit-{method}"
            shutil.rmtree(theirs_out, ignore_errors=True)
            theirs = run_worker(["mergekit", merge_method, str(density), str(base), str(ft), str(theirs_out)],
                                args.limit_gb, __file__, python)
            theirs_cell = f"{merge_method} {density:g}: {_cell(theirs)}"
            if ours["ok"] and theirs["ok"]:
                speed = f"{ours['wall'] / theirs['wall']:.2f}"
                mine = out / f"{method}-{value:g}"
                check = (compare_trim(mine, theirs_out, base, ft) if method == "trim" else
                         f"kept share {kept_share(mine, base, ft):.4f} (ours) vs {kept_share(theirs_out, base, ft):.4f} "
                         f"(mergekit), expected {1 - value:.4f}")
            shutil.rmtree(theirs_out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        values = ",".join(f"{v:g}" for v in SWEEPS[method])
        rows.append([f"{gb:g}", method, values, _cell(ours), str(ours.get("passes", "-")), rss, theirs_cell, speed, check])
        print(f"  {method}: {rows[-1][3]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,6", help="comma list of GB per model (bf16; default 0.5,6)")
    parser.add_argument("--methods", default="restore,wise,dare,trim", help="comma list of methods")
    parser.add_argument("--shard-mb", type=int, default=500, help="shard size of the synthetic checkpoints")
    parser.add_argument("--limit-gb", type=float, default=20, help="RLIMIT_AS of every worker")
    parser.add_argument("--mergekit-python", help="interpreter with mergekit (default: this one or /work/mk/bin/python)")
    parser.add_argument("--workdir", default="/tmp/sftlens-repair-bench")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        print(json.dumps(worker_ours(*rest) if kind == "ours" else worker_mergekit(*rest)))
        return
    args.methods = [m for m in args.methods.split(",") if m]
    python = mergekit_python(args.mergekit_python)
    print(f"mergekit: {python or NOT_INSTALLED}")
    rows = []
    for gb in (float(s) for s in args.sizes.split(",") if s):
        root = Path(args.workdir) / f"{gb:g}gb"
        try:
            rows += measure(gb, root, args, python)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    print(f"\nours: a sweep of 5 values in one process; mergekit: one value. Cells: wall / CPU / peak RSS. "
          f"RSS ratio = peak / {RSS_TARGET_GB:g} GB (target < 1 at 6 GB); speed ratio = our sweep's wall / "
          f"mergekit's one value (target <= 1).\n")
    header = ["GB", "method", "values", "ours (sweep)", "passes", "RSS ratio", "mergekit (one value)",
              "speed ratio", "same output"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
