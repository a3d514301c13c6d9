"""Stage: closed-book QA accuracy per mastery level (paper Sections 3.3-3.4).

Greedy decoding of at most 16 new tokens from the training prompt (BOS + "<question> q <answer>"),
batched with left padding, each prompt leaving the batch at its EOS (`sftlens.decoding`); an output is
correct when the matcher finds a gold answer in it.
Accuracy is reported per (domain, test level); the paper's Acc is the mean of the level
accuracies, `micro` the mean over facts. The same functions score a base model, a fine-tuned
model, an edited model in memory (`evaluate_splits`: restore, repair and studies call it), or a
model on its own training set (the paper's Table 5): any split JSONL works.

`evaluate` keeps one folder per (model, test files, settings): predictions are appended batch by
batch to a partial log keyed by those inputs, so an interrupted evaluation resumes where it
stopped; the final predictions.jsonl and summary.json are written atomically.

Records (long format, the input of every accuracy table): one dict per (domain, test level) with
`domain`, `test_level`, `n`, `correct`, `accuracy` (0..1); callers add tags (`evaluate_splits`: `split`; a
study: `sftlens.study.report.results`). Acc averages the levels with at least `MIN_N` = 30 facts
(`acc_levels`; all present levels when none has). `summary.json`: `key`, `model`, `tests` (a manifest per
file), `config`, `records`, `acc`, `micro` per domain; `predictions.jsonl`: fact_id, domain, level,
answers, prediction, correct, source (in file order). `batch_size` is not keyed (`sftlens.config.keyed_dict`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sftlens.config import NOT_KEYED, add_config_arguments, config_from_args, config_to_dict, keyed_dict
from sftlens.data import default_matcher, encode_prompt
from sftlens.data.rows import data_manifest, read_split_rows
from sftlens.decoding import decode
from sftlens.errors import SftlensError
from sftlens.io import JsonlAppender, KeyedOutput, atomic_write_jsonl, read_jsonl, stable_hash
from sftlens.markdown import markdown_table
from sftlens.models import load_model, model_fingerprint

EVAL_KEYS = ("fact_id", "domain", "level", "answers", "prompt")
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = field(default=16, metadata={"help": "longest generated answer, in tokens"})
    # Not keyed: no prediction depends on the batch size.
    batch_size: int = field(default=256, metadata={"help": "prompts decoded together", **NOT_KEYED})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of one batch of prompts; a prompt leaves the batch at its EOS."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    tokens = decode(model, encoded, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def _batches_by_length(tokenizer, rows: list[dict], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar prompt length (less padding); longest first, so an
    out-of-memory batch size fails at once rather than at the end."""
    lengths = [len(encode_prompt(tokenizer, r["prompt"])) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def evaluate_model(model, tokenizer, rows: list[dict], config: EvalConfig = EvalConfig(), progress: bool = True,
                   on_batch: Callable[[list[tuple[int, dict]]], None] | None = None) -> list[dict]:
    """Predictions for `rows` (split JSONL rows), in their order.

    `on_batch` receives each finished batch as (row index, prediction) pairs, to persist them.
    """
    matcher = default_matcher()
    predictions: list[dict | None] = [None] * len(rows)
    batches = _batches_by_length(tokenizer, rows, config.batch_size)
    with tqdm(total=len(rows), desc="evaluate", unit="fact", disable=not progress) as bar:
        for indices in batches:
            texts = generate_answers(model, tokenizer, [rows[i]["prompt"] for i in indices], config.max_new_tokens)
            done = []
            for i, text in zip(indices, texts):
                row = rows[i]
                predictions[i] = {"fact_id": row["fact_id"], "domain": row["domain"], "level": row["level"],
                                  "answers": row["answers"], "prediction": text,
                                  "correct": matcher.is_correct(text, row["answers"])}
                done.append((i, predictions[i]))
            if on_batch:
                on_batch(done)
            bar.update(len(indices))
    return predictions  # type: ignore[return-value]


def summarize(predictions: list[dict]) -> list[dict]:
    """Long-format records: one per (domain, test level) with n, correct and accuracy."""
    groups: dict[tuple[str, int], list[bool]] = {}
    for p in predictions:
        groups.setdefault((p["domain"], p["level"]), []).append(bool(p["correct"]))
    return [{"domain": domain, "test_level": level, "n": len(hits), "correct": sum(hits),
             "accuracy": sum(hits) / len(hits)}
            for (domain, level), hits in sorted(groups.items())]


def _domain_records(records: list[dict], domain: str) -> list[dict]:
    selected = [r for r in records if r["domain"] == domain]
    if not selected:
        raise SftlensError(f"no evaluation records for domain {domain!r}")
    return selected


# A test level with fewer facts than this is too noisy to average or to decide anything on: Acc
# leaves it out (and a study report marks its cells and keeps it out of every verdict).
MIN_N = 30


def acc_levels(records: list[dict], domain: str, min_n: int = MIN_N) -> list[int]:
    """The test levels Acc averages for one domain: those with at least `min_n` facts, or, when
    none has that many (a toy run), every level with a fact."""
    present = sorted({r["test_level"] for r in records if r["domain"] == domain and r["n"] > 0})
    large = [lv for lv in present
             if all(r["n"] >= min_n for r in records if r["domain"] == domain and r["test_level"] == lv)]
    return large or present


def acc_of(records: list[dict], domain: str, levels: list[int] | None = None) -> float:
    """The paper's Acc: the mean of the per-level accuracies, each level weighing the same, over
    `levels` (default `acc_levels`: the levels with enough facts)."""
    selected = _domain_records(records, domain)
    levels = acc_levels(selected, domain) if levels is None else levels
    values = [r["accuracy"] for r in selected if r["test_level"] in levels]
    if not values:
        raise SftlensError(f"no evaluation records for domain {domain!r} at levels {levels}")
    return sum(values) / len(values)


def micro_of(records: list[dict], domain: str) -> float:
    """Accuracy over all facts of a domain, so larger levels weigh more."""
    selected = _domain_records(records, domain)
    return sum(r["correct"] for r in selected) / sum(r["n"] for r in selected)


def evaluate_splits(model, tokenizer, rows_by_split: dict[str, list[dict]], config: EvalConfig, tag: dict,
                    progress: bool = True) -> tuple[list[dict], dict[str, list[dict]]]:
    """Evaluation records of a loaded `model` (edited or not) on each split's rows, tagged with
    `split` and `tag`, and each split's predictions: how repairs, restoration and studies score
    models in memory."""
    records, predictions = [], {}
    for split, rows in rows_by_split.items():
        predictions[split] = evaluate_model(model, tokenizer, rows, config, progress)
        records += [{**rec, "split": split, **tag} for rec in summarize(predictions[split])]
    return records, predictions


def format_level_table(records: list[dict]) -> str:
    """Markdown: one row per domain, accuracy (%) per test level, then Acc, micro and n."""
    levels = sorted({r["test_level"] for r in records})
    rows = []
    for domain in sorted({r["domain"] for r in records}):
        by_level = {r["test_level"]: r for r in records if r["domain"] == domain}
        cells = [f"{100 * by_level[lv]['accuracy']:.2f}" if lv in by_level else "–" for lv in levels]
        n = sum(r["n"] for r in by_level.values())
        rows.append([domain, *cells, f"{100 * acc_of(records, domain):.2f}", f"{100 * micro_of(records, domain):.2f}", n])
    return markdown_table(["domain", *(f"level {lv}" for lv in levels), "Acc", "micro", "n"], rows)


def load_test_rows(test_files: list[Path]) -> tuple[list[dict], list[dict]]:
    """The rows of every file (each tagged with its `source` file name) and one manifest per file.
    A split writes one file per domain and level, and a weak base model leaves some levels empty:
    such files count (as no facts), but files that are all empty are an error."""
    rows, manifests = [], []
    for path in map(Path, test_files):
        file_rows = read_split_rows(path, EVAL_KEYS, allow_empty=True)
        rows += [{**row, "source": path.name} for row in file_rows]
        manifests.append(data_manifest(path, file_rows))
    if not rows:
        raise SftlensError(f"no examples in {', '.join(str(p) for p in test_files)} (all empty)")
    return rows, manifests


def _evaluation_key(model: str, manifests: list[dict], config: EvalConfig) -> str:
    return stable_hash({"model_fingerprint": model_fingerprint(model),
                        "tests": [(m["sha256"], m["count"]) for m in manifests], "config": keyed_dict(config)})


def evaluate(model: str, test_files: list[Path], out_dir: Path, config: EvalConfig = EvalConfig(),
             progress: bool = True) -> list[dict]:
    """Evaluate `model` (a --model spec) on split JSONL files; return the long-format records.

    Writes predictions.jsonl (one row per fact, in file order) and summary.json into `out_dir`.
    """
    test_files, out_dir = [Path(p) for p in test_files], Path(out_dir)
    if not test_files:
        raise SftlensError("no test files given")
    rows, manifests = load_test_rows(test_files)
    key = _evaluation_key(model, manifests, config)
    output = KeyedOutput(out_dir, key, SUMMARY_FILE, what="an sftlens evaluation")
    finished = output.finished()
    if finished is not None:
        if progress:
            print(f"{out_dir}: already evaluated, skipping")
        return finished["records"]

    partial = output.log(PREDICTIONS_FILE)
    done = {row["index"]: row["prediction"] for row in read_jsonl(partial)} if partial.is_file() else {}
    pending = [i for i in range(len(rows)) if i not in done]
    if pending:
        net, tokenizer = load_model(model, dtype=config.dtype, device=config.device)
        with JsonlAppender(partial) as log:
            def persist(batch):
                for j, prediction in batch:
                    log.write({"index": pending[j], "prediction": prediction})
                    done[pending[j]] = prediction

            evaluate_model(net, tokenizer, [rows[i] for i in pending], config, progress, on_batch=persist)

    predictions = [{**done[i], "source": rows[i]["source"]} for i in range(len(rows))]
    records = summarize(predictions)
    domains = sorted({r["domain"] for r in records})
    atomic_write_jsonl(out_dir / PREDICTIONS_FILE, predictions)
    output.write({  # summary.json last: it marks the evaluation finished
        "model": model, "tests": manifests, "config": config_to_dict(config), "records": records,
        "acc": {d: acc_of(records, d) for d in domains}, "micro": {d: micro_of(records, d) for d in domains},
    })
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    return records


def _test_files(args: argparse.Namespace) -> list[Path]:
    if bool(args.test) == bool(args.split_dir):
        raise SftlensError("give either --test FILE [FILE ...] or --split-dir DIR")
    if args.test:
        return [Path(p) for p in args.test]
    files = sorted((Path(args.split_dir) / "test").glob("*.jsonl"))
    if not files:
        raise SftlensError(f"{args.split_dir}: no test/*.jsonl files")
    return files


def _run_eval(args: argparse.Namespace) -> None:
    config = config_from_args(EvalConfig, args)
    records = evaluate(args.model, _test_files(args), Path(args.out), config, progress=True)
    print(format_level_table(records))


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="accuracy per mastery level (greedy decoding)")
    parser.add_argument("--model", required=True, help="built-in name, local HF folder or hub id")
    parser.add_argument("--test", nargs="+", metavar="FILE", help="split JSONL files to evaluate on")
    parser.add_argument("--split-dir", help="a split folder: evaluate on all of its test/*.jsonl")
    parser.add_argument("--out", required=True, help="folder for predictions.jsonl and summary.json")
    add_config_arguments(parser, EvalConfig)
    parser.set_defaults(func=_run_eval, writes="out")
