"""Streamed restore sweep versus the naive published step, on synthetic sharded checkpoints.

Builds a Llama-shaped bf16 base checkpoint of about `--gb` GB in shards of `--shard-mb` MB and a
"fine-tuned" copy whose update is concentrated like a real SFT (relative change log-normal, a few
per cent of the elements holding most of the change), then runs, each in its own subprocess under
RLIMIT_AS = `--limit-gb`:

  ours   `sftlens.weights.repair_sweep` (method restore) over all ratios in one run (streamed, exact threshold);
  naive  the published step, one process per ratio: load both models whole, one flat fp32
         relative-change vector over the layers but not norms, `torch.topk`, restore, save.

It reports wall time and peak RSS of each, where the naive one fails, and whether the restored
checkpoints are identical where both finish (elements tied at the threshold may differ: topk
breaks ties arbitrarily; the differing elements are checked to be such ties).

    python bench/restore_scaling.py              # 0.5 GB per model (a few minutes on 2 cores)
    python bench/restore_scaling.py --large      # 6 GB per model (needs ~60 GB of disk)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RATIOS = (1, 3, 5, 10, 20, 40, 60)
BYTES_PER_ELEMENT = 2  # bf16


def layout(gb: float) -> tuple[int, int, int]:
    """(hidden, layers, vocab) of a Llama-like model with about `gb` GB of bf16 weights."""
    params = gb * 1e9 / BYTES_PER_ELEMENT
    hidden = 1024 if gb < 2 else 2560
    vocab = 24_000 if gb < 2 else 50_000
    per_layer = 4 * hidden * hidden + 3 * hidden * 4 * hidden + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return hidden, layers, vocab


def tensor_shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (4 * hidden, hidden), p + "mlp.up_proj.weight": (4 * hidden, hidden),
                       p + "mlp.down_proj.weight": (hidden, 4 * hidden),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def build_checkpoints(root: Path, gb: float, shard_mb: int, seed: int = 0) -> tuple[Path, Path]:
    """Write base/ and finetuned/ (skipped when a complete pair with these settings exists)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    spec = {"gb": gb, "shard_mb": shard_mb, "seed": seed}
    base_dir, ft_dir = root / "base", root / "finetuned"
    stamp = root / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return base_dir, ft_dir
    shutil.rmtree(root, ignore_errors=True)
    hidden, layers, vocab = layout(gb)
    shapes = tensor_shapes(hidden, layers, vocab)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * BYTES_PER_ELEMENT
        if current and size + nbytes > shard_mb * 1e6:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for d in (base_dir, ft_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                   "num_hidden_layers": layers, "vocab_size": vocab}))
    for s, names in enumerate(tqdm(groups, desc=f"building {gb:g} GB checkpoints", unit="shard")):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        base, ft = {}, {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                b = 1 + 0.1 * torch.randn(shape, generator=gen)
            else:
                b = 0.02 * torch.randn(shape, generator=gen)
            # log-normal relative change with a random sign: most elements move by ~0.5 %, a few by
            # far more, so the top 1 % holds a large share of the total (as in the paper's Table 3)
            rel = 0.005 * torch.exp(1.5 * torch.randn(shape, generator=gen))
            sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
            base[name] = b.to(torch.bfloat16)
            ft[name] = (b + b.abs() * rel * sign).to(torch.bfloat16)
            del b, rel, sign
        save_file(base, base_dir / fname, metadata={"format": "pt"})
        save_file(ft, ft_dir / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del base, ft
    total = sum(math.prod(s) for s in shapes.values()) * BYTES_PER_ELEMENT
    for d in (base_dir, ft_dir):
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    stamp.write_text(json.dumps(spec))
    return base_dir, ft_dir


# --- workers (run in subprocesses) ----------------------------------------------------------

def _peak_rss_bytes() -> int:
    """This process's peak RSS since exec (VmHWM). Not ru_maxrss: Linux carries it over exec from
    the forked parent, so a worker would report at least this script's own RSS after building
    the checkpoints (about 1.3 GB at 6 GB per model)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _usage() -> dict:
    """Peak RSS and CPU seconds of this process (CPU time is less sensitive than wall time to
    other work sharing the machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_gb": _peak_rss_bytes() / 1e9, "cpu": usage.ru_utime + usage.ru_stime}


def _stage(text: str) -> None:
    print(f"stage: {text}", file=sys.stderr, flush=True)


def worker_ours(base: str, ft: str, out: str, ratios: list[float]) -> dict:
    from sftlens.restore import RestoreConfig, as_repair
    from sftlens.weights import repair_sweep

    start = time.perf_counter()
    folders = repair_sweep(base, ft, ratios, as_repair(RestoreConfig()), out, progress=False)
    passes = json.loads((folders[ratios[0]] / "restore.json").read_text())["passes"]
    return {"seconds": time.perf_counter() - start, "passes": passes, **_usage()}


def _is_body(name: str) -> bool:
    return ".layers." in name and "norm" not in name


def worker_naive(base: str, ft: str, out: str, ratio: float) -> dict:
    """The published step, faithfully naive: everything in memory, one flat vector, torch.topk."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    base_dir, ft_dir, out_dir = Path(base), Path(ft), Path(out)
    shards = sorted(p.name for p in ft_dir.glob("*.safetensors"))
    _stage("load both models")
    old, new = {}, {}
    for shard in shards:
        old.update(load_file(base_dir / shard))
        new.update(load_file(ft_dir / shard))
    names = sorted(n for n in new if _is_body(n))
    _stage("flat relative change")
    flat = torch.cat([((new[n].float() - old[n].float()).abs() / (old[n].float().abs() + 1e-8)).view(-1)
                      for n in names])
    k = math.floor(flat.numel() * ratio / 100)
    _stage(f"torch.topk k={k} of {flat.numel()}")
    selected = torch.topk(flat, k).indices
    del flat
    _stage("restore and save")
    mask = torch.zeros(sum(new[n].numel() for n in names), dtype=torch.bool)
    mask[selected] = True
    del selected
    offset = 0
    for n in names:
        size = new[n].numel()
        part = mask[offset:offset + size].view(new[n].shape)
        new[n] = torch.where(part, old[n], new[n])
        offset += size
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        from safetensors import safe_open

        with safe_open(ft_dir / shard, framework="pt") as f:
            keys = list(f.keys())
        save_file({n: new[n] for n in keys}, out_dir / shard, metadata={"format": "pt"})
    return {"seconds": time.perf_counter() - start, **_usage()}


def run_worker(args: list[str], limit_gb: float, script: str = __file__, python: str = sys.executable) -> dict:
    """Run `script` (this one by default) as a worker under RLIMIT_AS; return its JSON or where it failed."""
    def limit():
        cap = int(limit_gb * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    proc = subprocess.run([python, script, "--worker", *args], capture_output=True, text=True,
                          preexec_fn=limit)
    wall = time.perf_counter() - start
    if proc.returncode == 0:
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall": wall, "ok": True}
    stages = [line for line in proc.stderr.splitlines() if line.startswith("stage: ")]
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    return {"ok": False, "wall": wall, "failed_at": stages[-1][7:] if stages else "start",
            "error": (errors[-1] if errors else (proc.stderr.strip().splitlines() or ["killed"])[-1])[:160],
            "returncode": proc.returncode}


# --- comparison -----------------------------------------------------------------------------

def compare(ours: Path, naive: Path, base: Path, ft: Path) -> dict:
    """Elements restored by one run but not the other, and whether they are all threshold ties."""
    from safetensors import safe_open

    differing, values = 0, set()
    restored_ours = restored_naive = 0
    for shard in sorted(p.name for p in ft.glob("*.safetensors")):
        with safe_open(ours / shard, "pt") as o, safe_open(naive / shard, "pt") as n, \
                safe_open(base / shard, "pt") as b, safe_open(ft / shard, "pt") as f:
            for name in o.keys():
                if not _is_body(name):
                    continue
                to, tn, tb, tf = o.get_tensor(name), n.get_tensor(name), b.get_tensor(name), f.get_tensor(name)
                changed = tb != tf
                in_ours, in_naive = (to == tb) & changed, (tn == tb) & changed
                restored_ours += int(in_ours.sum())
                restored_naive += int(in_naive.sum())
                diff = in_ours != in_naive
                if diff.any():
                    differing += int(diff.sum())
                    rel = (tf.float() - tb.float()).abs() / (tb.float().abs() + 1e-8)
                    values |= set(rel[diff].unique().tolist())
    return {"differing": differing, "tie_values": sorted(values)[:3], "all_ties": len(values) <= 1,
            "restored_ours": restored_ours, "restored_naive": restored_naive}


def _describe(same: dict | None) -> str:
    if same is None:
        return "-"
    if not same["differing"]:
        return f"identical ({same['restored_ours']:,} changed elements restored)"
    verdict = "all tied at the threshold" if same["all_ties"] else "NOT ties: selections differ"
    return (f"{same['restored_ours']:,} vs {same['restored_naive']:,} restored; {same['differing']:,} elements "
            f"differ, {verdict} (value {same['tie_values'][0]:.6g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=0.5, help="size of each model in GB (bf16)")
    parser.add_argument("--large", action="store_true", help="the 6 GB per model case")
    parser.add_argument("--shard-mb", type=int, default=500, help="shard size of the synthetic checkpoints")
    parser.add_argument("--limit-gb", type=float, default=20, help="RLIMIT_AS of every worker")
    parser.add_argument("--workdir", default="/tmp/sftlens-restore-bench")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    parser.add_argument("--skip-naive", action="store_true", help="only run the streamed sweep")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, base, ft, out, *ratios = args.worker
        fn = worker_ours if kind == "ours" else worker_naive
        result = fn(base, ft, out, [float(r) for r in ratios]) if kind == "ours" else fn(base, ft, out, float(ratios[0]))
        print(json.dumps(result))
        return

    gb = 6.0 if args.large else args.gb
    root = Path(args.workdir) / f"{gb:g}gb"
    try:
        base, ft = build_checkpoints(root / "inputs", gb, args.shard_mb)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
        print(f"checkpoints: {size:.2f} GB per model, {len(list(base.glob('*.safetensors')))} shards, "
              f"{os.cpu_count()} CPUs, RLIMIT_AS {args.limit_gb:g} GB per worker")
        shutil.rmtree(root / "ours", ignore_errors=True)
        ours = run_worker(["ours", str(base), str(ft), str(root / "ours"), *map(str, RATIOS)], args.limit_gb)
        print(f"ours  (one process, {len(RATIOS)} ratios): " + (
            f"wall {ours['wall']:.1f}s, CPU {ours['cpu']:.1f}s, peak RSS {ours['peak_rss_gb']:.2f} GB, "
            f"{ours['passes']} passes over the weights"
            if ours["ok"] else f"FAILED at {ours['failed_at']}: {ours['error']}"))
        if args.skip_naive:
            return
        naive_total, naive_cpu, naive_peak, rows = 0.0, 0.0, 0.0, []
        for ratio in RATIOS:
            out = root / f"naive-{ratio}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_worker(["naive", str(base), str(ft), str(out), str(ratio)], args.limit_gb)
            naive_total += result["wall"]
            if result["ok"]:
                naive_peak = max(naive_peak, result["peak_rss_gb"])
                naive_cpu += result["cpu"]
                same = compare(root / "ours" / f"top-{ratio:g}", out, base, ft) if ours["ok"] else None
                rows.append((ratio, f"{result['wall']:.1f}s", f"{result['cpu']:.1f}s", f"{result['peak_rss_gb']:.2f} GB",
                             _describe(same)))
            else:
                rows.append((ratio, f"{result['wall']:.1f}s", "-", "-",
                             f"FAILED at '{result['failed_at']}': {result['error']}"))
                print(f"naive {ratio}%: failed at '{result['failed_at']}' ({result['error']}); skipping the rest")
                break
            shutil.rmtree(out, ignore_errors=True)
        print("\n| ratio (%) | naive wall | naive CPU | naive peak RSS | comparison with ours |")
        print("|---:|---:|---:|---:|---|")
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
        finished = len(rows) == len(RATIOS) and not rows[-1][-1].startswith("FAILED")
        if finished and ours["ok"]:
            print(f"\nnaive total: wall {naive_total:.1f}s, CPU {naive_cpu:.1f}s, peak {naive_peak:.2f} GB; "
                  f"ours: wall {ours['wall']:.1f}s, CPU {ours['cpu']:.1f}s, peak {ours['peak_rss_gb']:.2f} GB; "
                  f"speed-up {naive_total / ours['wall']:.1f}x (wall), {naive_cpu / ours['cpu']:.1f}x (CPU)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
