"""The spectral repair's cost per matrix against a plain `torch.linalg.svd` loop, on a random-init Llama
of SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab 49152) built in-process.

The fine-tuned checkpoint is the base plus, per layer matrix, a rank-8 update and small noise (the
case the Gavish-Donoho threshold is made for), saved like SmolLM2 (bf16, tied embeddings). Two
workers, each in its own subprocess so that its peak RSS (VmHWM) is its own:

  per-matrix  for every region matrix, in turn: a plain loop (read both tensors, fp32 difference,
              `torch.linalg.svd(full_matrices=False)`), then the spectral edit of the same matrix
              for the whole sweep (read, SVD, one reconstruction per value; nothing written);
  sweep       `sftlens.weights.repair_sweep(method="spectral")`: the sweep written as HF folders.

Prints milliseconds per matrix by shape (svd loop, spectral edit, their ratio), the kept ranks at
c = 1 (the planted rank is 8), and each worker's wall time and peak RSS.

    python bench/spectral_repair.py               # 2 layers: well under a minute on one core
    python bench/spectral_repair.py --layers 30   # the whole SmolLM2-135M body (210 matrices)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restore_scaling import _usage, run_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLANTED_RANK = 8


def build_pair(root: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """base/ and finetuned/ HF folders of a random-init SmolLM2-135M-shaped Llama with `layers` layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base, ft = root / "base", root / "finetuned"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                m, n = p.shape
                low_rank = torch.randn(m, PLANTED_RANK, generator=gen) @ torch.randn(PLANTED_RANK, n, generator=gen)
                p.add_((3e-4 * low_rank + 1e-3 * torch.randn(m, n, generator=gen)).to(p.dtype))
    model.save_pretrained(ft)
    return base, ft


# --- workers (run in subprocesses) ----------------------------------------------------------

def worker_per_matrix(base: str, ft: str, values: str) -> dict:
    sys.path.insert(0, str(REPO))  # this checkout's sftlens, not an installed one
    from sftlens.weights import METHODS, RepairConfig
    from sftlens.weights.checkpoints import open_pair
    from sftlens.weights.spectral import kept_rank

    pair = open_pair(base, ft)
    sweep = tuple(float(v) for v in values.split(","))
    edit = METHODS["spectral"].edit(pair, sweep, RepairConfig(method="spectral"), False)
    rows = defaultdict(lambda: {"svd": [], "spectral": [], "ranks": []})
    for name in edit.names:
        shape = pair.base.shapes[name]
        if len(shape) != 2:
            continue
        start = time.perf_counter()
        b, f = pair.base.read(name, None), pair.finetuned.read(name, None)
        s = torch.linalg.svd(f.float() - b.float(), full_matrices=False)[1]
        middle = time.perf_counter()
        for _ in edit.tensor(name, range(len(sweep))):
            pass
        end = time.perf_counter()
        row = rows["x".join(map(str, shape))]
        row["svd"].append(middle - start)
        row["spectral"].append(end - middle)
        row["ranks"].append(kept_rank(s, shape, 1.0))
    return {"rows": rows, "threads": torch.get_num_threads(), **_usage()}


def worker_sweep(base: str, ft: str, values: str, out: str) -> dict:
    sys.path.insert(0, str(REPO))
    from sftlens.weights import RepairConfig, repair_sweep

    start = time.perf_counter()
    repair_sweep(base, ft, values.split(","), RepairConfig(method="spectral"), out, progress=False)
    return {"seconds": time.perf_counter() - start, **_usage()}


# --- the run --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (SmolLM2-135M has 30; default 2)")
    parser.add_argument("--values", default="0.5,1,2", help="the sweep of c (default 0.5,1,2)")
    parser.add_argument("--limit-gb", type=float, default=20, help="RLIMIT_AS of every worker")
    parser.add_argument("--workdir", default="/tmp/sftlens-spectral-bench")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        print(json.dumps(worker_per_matrix(*rest) if kind == "per-matrix" else worker_sweep(*rest)))
        return
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    try:
        base, ft = build_pair(root / "inputs", args.layers)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
        print(f"{args.layers} layers, {size:.2f} GB per model (bf16); sweep c = {args.values}", flush=True)
        per = run_worker(["per-matrix", str(base), str(ft), args.values], args.limit_gb, __file__)
        sweep = run_worker(["sweep", str(base), str(ft), args.values, str(root / "out")], args.limit_gb, __file__)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, result in (("per-matrix", per), ("sweep", sweep)):
        if not result["ok"]:
            sys.exit(f"{name} worker FAILED at {result['failed_at']}: {result['error']}")
    print(f"\ntorch threads: {per['threads']}; ms per matrix (mean over the matrices of a shape); "
          f"spectral = read + one SVD + {len(args.values.split(','))} reconstructions\n")
    print("| shape | matrices | svd loop (ms) | spectral edit (ms) | ratio | kept rank at c = 1 |")
    print("|---|---|---|---|---|---|")
    for shape, row in sorted(per["rows"].items()):
        svd, spectral = (1e3 * sum(row[k]) / len(row[k]) for k in ("svd", "spectral"))
        ranks = sorted(set(row["ranks"]))
        print(f"| {shape} | {len(row['svd'])} | {svd:.1f} | {spectral:.1f} | {spectral / svd:.2f} | "
              f"{', '.join(map(str, ranks))} (planted {PLANTED_RANK}) |")
    print(f"\nper-matrix worker: wall {per['wall']:.1f}s, peak RSS {per['peak_rss_gb']:.2f} GB")
    print(f"repair_sweep (written, {len(args.values.split(','))} folders): wall {sweep['wall']:.1f}s, "
          f"CPU {sweep['cpu']:.1f}s, peak RSS {sweep['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
