"""SFT throughput: `sftlens.train.train` against a plain PyTorch loop, in the same process.

Both runs load SmolLM2-135M in fp32 on the CPU, see the same batches in the same order (the plain
loop iterates the Trainer's own dataloader), use AdamW with the same cosine schedule and gradient
clipping, and end by saving the model folder. Reported: wall time (load + train + save),
examples/s, peak resident memory, and the per-step loss of each run; then the same SFT under bf16
autocast. Target: sftlens at least 0.9x the plain loop's examples/s.

    python bench/train_throughput.py                 # 32 examples (4 steps): minutes on 2 idle cores
    python bench/train_throughput.py --examples 240  # the issue's 240-example run (30 steps)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sftlens.data import in_domain_relations, load_facts, sft_completion, sft_prompt
from sftlens.io import read_jsonl
from sftlens.models import load_model, resolve_model
from sftlens.train import (
    LOSS_FILE,
    TrainConfig,
    _build_trainer,
    _training_arguments,
    encode_sft_set,
    train,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "entityquestions"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss():
    """Sample resident memory every 10 ms; yields a dict that gets `peak` (bytes) on exit."""
    result = {"peak": rss_bytes()}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            result["peak"] = max(result["peak"], rss_bytes())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def write_sft_set(data_dir: Path, n: int, path: Path) -> Path:
    facts = load_facts(data_dir, splits="train", relations=in_domain_relations()).facts
    random.Random(0).shuffle(facts)
    rows = [{"fact_id": f.id, "prompt": sft_prompt(f.question), "completion": sft_completion(f.answers[0])}
            for f in facts[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_loop(model_spec: str, sft_path: Path, out_dir: Path, config: TrainConfig) -> list[float]:
    """The baseline: a hand-written loop over the same batches, optimizer and schedule."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu")
    rows = read_jsonl(sft_path)
    examples = encode_sft_set(tokenizer, rows, sft_path, model.config.max_position_embeddings)
    # Only the Trainer's dataloader is borrowed, so both runs see identical batches.
    args = _training_arguments(config, out_dir / "unused", progress=False)
    loader = _build_trainer(model, tokenizer, examples, args, progress=False).get_train_dataloader()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, len(loader))
    model.train()
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")
    return losses


def measure(name: str, n: int, run) -> dict:
    gc.collect()
    base = rss_bytes()
    with peak_rss() as memory:
        start = time.perf_counter()
        losses = run()
        wall = time.perf_counter() - start
    result = {"name": name, "wall_s": wall, "examples_per_s": n / wall, "peak_rss_gib": memory["peak"] / 2**30,
              "peak_over_start_gib": (memory["peak"] - base) / 2**30, "losses": losses}
    print(f"{name:>14}: {wall:7.1f} s  {n / wall:6.2f} ex/s  peak RSS {result['peak_rss_gib']:.2f} GiB "
          f"(+{result['peak_over_start_gib']:.2f})  loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return result


def sftlens_run(model_spec: str, sft_path: Path, out_dir: Path, config: TrainConfig):
    def run():
        out = train(model_spec, sft_path, out_dir, config, progress=False)
        return [row["loss"] for row in read_jsonl(out / LOSS_FILE)]

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32, help="SFT set size (issue: 240)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("SFTLENS_DATA_DIR", DEFAULT_DATA))
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast run")
    args = parser.parse_args()

    model_spec = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="sftlens-bench-train-"))
    try:
        sft_path = write_sft_set(Path(args.data_dir), args.examples, work / "sft.jsonl")
        config = TrainConfig()
        print(f"{args.examples} examples, batch {config.batch_size}, {torch.get_num_threads()} threads, "
              f"cpu capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
        load_model(model_spec, device="cpu")  # warm the page cache so neither run pays for the first read
        plain = measure("plain loop", args.examples, lambda: plain_loop(model_spec, sft_path, work / "plain", config))
        ours = measure("sftlens train", args.examples, sftlens_run(model_spec, sft_path, work / "fp32", config))
        ratio = ours["examples_per_s"] / plain["examples_per_s"]
        drift = max(abs(a - b) for a, b in zip(plain["losses"], ours["losses"]))
        print(f"sftlens / plain = {ratio:.3f}x (target >= 0.9): {'PASS' if ratio >= 0.9 else 'FAIL'}; "
              f"max per-step loss difference {drift:.2e}")
        if not args.no_bf16:
            bf16 = measure("sftlens bf16", args.examples,
                           sftlens_run(model_spec, sft_path, work / "bf16", TrainConfig(bf16=True)))
            diffs = [b - a for a, b in zip(ours["losses"], bf16["losses"])]
            print(f"bf16 autocast / fp32 speed = {bf16['examples_per_s'] / ours['examples_per_s']:.3f}x; "
                  f"loss bf16 - fp32 per step: mean {sum(diffs) / len(diffs):+.4f}, "
                  f"max |.| {max(map(abs, diffs)):.4f}; final {bf16['losses'][-1]:.4f} vs {ours['losses'][-1]:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
