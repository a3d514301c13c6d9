"""Parameter restoration (paper Section 5.1) and the other repairs, as pipeline stages: the
`restore` CLI (the paper's name) and the `repair` CLI (any method of `sftlens.weights.methods`),
writing one HF folder per value or evaluating every value of a sweep in memory.

The editing itself lives in `sftlens.weights`: restoration sets the selected elements of a
fine-tuned model back to their base values, with the exact streamed selection of
`sftlens.weights.selection` (exactly floor(n * k / 100) elements, ties broken by sorted tensor
name, then flat index); folders are written by `sftlens.weights.apply` in one pass for all ratios,
atomically and keyed by their inputs, so a re-run skips finished ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.errors import SftlensError
from sftlens.evaluate import RESULT_NEUTRAL, EvalConfig, acc_of, evaluate_model, load_test_rows, summarize
from sftlens.io import atomic_write_json, atomic_write_text, stable_hash
from sftlens.markdown import markdown_table
from sftlens.models import load_model
from sftlens.weights import METHODS, RepairConfig, parse_values, repair_sweep, repaired_models
from sftlens.weights.apply import apply_in_memory, record_names, sweep_key, value_folder
from sftlens.weights.checkpoints import open_pair
from sftlens.weights.methods import selection_edit
from sftlens.weights.selection import DEFAULT_RATIOS, Selection, SelectionConfig, parse_ratios, select

MANIFEST = record_names("restore")[0]


@dataclass(frozen=True)
class RestoreConfig(SelectionConfig):
    """Which fine-tuned elements go back to their base values (defaults: the paper's)."""


def as_repair(config: RestoreConfig) -> RepairConfig:
    return RepairConfig(method="restore", **config_to_dict(config))


def restore_sweep(base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                  out_root: str | Path = "restored", progress: bool = True) -> dict[float, Path]:
    """Write one restored HF folder per ratio under `out_root` (named `{strategy}-{ratio}`), each
    sharded like the fine-tuned input, with its config/tokenizer and a record of what was restored
    per tensor (restore.json, restored.tsv). Finished ratios are skipped."""
    return repair_sweep(base, finetuned, ratios, as_repair(config), out_root, progress)


def restore_in_memory(model, base, finetuned, ratio: float, config: RestoreConfig = RestoreConfig(),
                      selection: Selection | None = None, progress: bool = False):
    """Restore a loaded fine-tuned `model` in place (and return it), without writing a checkpoint.

    Every region tensor is rewritten from the two checkpoints, so calls for different ratios can
    follow each other on the same model; pass a `selection` from `select(...)` made for a sweep to
    skip the threshold passes. Tensors outside the region are left as they are (the fine-tuned ones).
    """
    pair = open_pair(base, finetuned)
    if selection is None:
        selection = select(pair, (ratio,), config, progress)
    ratio = parse_ratios([ratio])[0]
    if ratio not in selection.ratios:
        raise SftlensError(f"ratio {ratio:g} is not part of the selection ({', '.join(f'{r:g}' for r in selection.ratios)})")
    return apply_in_memory(model, pair, selection_edit(pair, selection), selection.ratios.index(ratio))


def restored_models(model, base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                    progress: bool = True) -> Iterator[tuple[float, object]]:
    """Yield (ratio, model restored in place at that ratio) for a whole sweep, sharing one selection;
    the model is left restored at the last ratio."""
    return repaired_models(model, base, finetuned, ratios, as_repair(config), progress)


def _eval_sets(test_files, train_file) -> dict[str, tuple[list[dict], list[dict]]]:
    if not test_files:
        raise SftlensError("--eval needs --test FILE [FILE ...]")
    sets = {"test": load_test_rows(list(test_files))}
    if train_file:
        sets["train"] = load_test_rows([train_file])
    return sets


def evaluate_splits(model, tokenizer, rows_by_split: dict[str, list[dict]], eval_config, tag: dict,
                    progress: bool = True) -> tuple[list[dict], dict[str, list[dict]]]:
    """Evaluation records of `model` on each split's rows, tagged with `split` and `tag`, and each
    split's predictions: the one evaluation of a restoration sweep (`restore --eval` and studies)."""
    records, predictions = [], {}
    for split, rows in rows_by_split.items():
        predictions[split] = evaluate_model(model, tokenizer, rows, eval_config, progress)
        records += [{**rec, "split": split, **tag} for rec in summarize(predictions[split])]
    return records, predictions


def _tag(config: RepairConfig, value: float) -> dict:
    """What marks a value's evaluation records (restore: the paper's `restore_ratio` and `strategy`)."""
    if config.method == "restore":
        return {"restore_ratio": value, "strategy": config.strategy}
    return {"method": config.method, "value": value}


def evaluate_repaired(base, finetuned, values, config: RepairConfig, test_files=(), out_dir: str | Path = "repaired",
                      eval_config=None, train_file=None, progress: bool = True) -> list[dict]:
    """Accuracy of the fine-tuned model as it is (the method's neutral value: restore ratio 0,
    wise alpha 1, dare p 0, trim d 100, spectral c 0) and edited at every value, editing in memory (no checkpoint
    written): the paper's Table 4 on `test_files`, Table 5 on `train_file`.

    Returns long-format evaluation records with `split` (test/train) and the value's tag (restore:
    `restore_ratio`, `strategy`; the others: `method`, `value`); each value's records are cached in
    out_dir/eval/ by inputs, so a re-run skips finished values."""
    eval_config = eval_config or EvalConfig()
    sets = _eval_sets(test_files, train_file)
    pair = open_pair(base, finetuned)
    neutral = METHODS[config.method].neutral
    levels = tuple(sorted({neutral, *parse_values(config.method, values)}))
    settings = {k: v for k, v in config_to_dict(eval_config).items() if k not in RESULT_NEUTRAL}
    manifests = {name: manifest for name, (_, manifest) in sets.items()}
    # "restore" labels the edit's key for every method: restore's cached evaluations keep their keys
    keys = {v: stable_hash({"format": 2, "restore": sweep_key(pair, config, v), "sets": manifests, "eval": settings})
            for v in levels}
    paths = {v: Path(out_dir) / "eval" / f"{value_folder(out_dir, config, v).name}.json" for v in levels}
    done = {}
    for v in levels:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            cached = json.loads(paths[v].read_text())
            if cached["key"] == keys[v]:
                done[v] = cached["records"]
    todo = [v for v in levels if v not in done]
    if todo:
        model, tokenizer = load_model(str(finetuned), dtype=eval_config.dtype, device=eval_config.device)

        def run(value: float) -> None:
            records, _ = evaluate_splits(model, tokenizer, {name: rows for name, (rows, _) in sets.items()}, eval_config,
                                         _tag(config, value), progress)
            atomic_write_json(paths[value], {"key": keys[value], "records": records})
            done[value] = records

        if neutral in todo:  # the model as loaded
            todo.remove(neutral)
            run(neutral)
        if todo:
            for value, _ in repaired_models(model, base, finetuned, todo, config, progress):
                run(value)
    return [rec for v in levels for rec in done[v]]


def evaluate_restored(base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                      test_files=(), out_dir: str | Path = "restored", eval_config=None, train_file=None,
                      progress: bool = True) -> list[dict]:
    """`evaluate_repaired` of restoration: records with `restore_ratio` (0 = unrestored) and `strategy`."""
    return evaluate_repaired(base, finetuned, ratios, as_repair(config), test_files, out_dir, eval_config,
                             train_file, progress)


def repair_table(records: list[dict], method: str = "restore") -> str:
    """Markdown, Table 4/5 layout: one row per value of the method's knob, the paper's Acc (%) per
    set and domain, with the change against the unedited model (the neutral value)."""
    column = "restore_ratio" if method == "restore" else "value"
    neutral = METHODS[method].neutral
    columns = sorted({(r["split"], r["domain"]) for r in records}, key=lambda c: (c[0] != "test", c[1]))
    values = sorted({r[column] for r in records})

    def acc(value: float, col: tuple[str, str]) -> float:
        part = [r for r in records if r[column] == value and r["split"] == col[0]]
        return 100 * acc_of(part, col[1])

    rows = [[f"{v:g}", *(f"{acc(v, c):.2f}" + (f" ({acc(v, c) - acc(neutral, c):+.2f})" if v != neutral and neutral in values else "")
                          for c in columns)] for v in values]
    knob = "restore (%)" if method == "restore" else f"{method} {METHODS[method].knob}"
    return markdown_table([knob, *(f"{s} {d} Acc" for s, d in columns)], rows, "r" * (len(columns) + 1))


def restore_table(records: list[dict]) -> str:
    return repair_table(records, "restore")


def _run_sweep(args: argparse.Namespace, config: RepairConfig) -> None:
    """Both verbs: evaluate the sweep in memory (--eval), or write one folder per value."""
    start = time.perf_counter()
    restore = config.method == "restore"
    if args.eval:
        records = evaluate_repaired(args.base, args.finetuned, args.values, config, args.test or (), args.out,
                                     config_from_args(EvalConfig, args), args.train)
        table = repair_table(records, config.method)
        prefix = config.strategy if restore else config.method
        atomic_write_text(Path(args.out) / "eval" / f"{prefix}-table.md", table + "\n")
        print(table)
        column = "restore_ratio" if restore else "value"
        print(f"evaluated {len({r[column] for r in records})} models in memory "
              f"in {time.perf_counter() - start:.1f}s")
        return
    folders = repair_sweep(args.base, args.finetuned, args.values, config, args.out)
    manifest_file, _, count = record_names(config.method)
    rows = []
    for value, folder in folders.items():
        manifest = json.loads((folder / manifest_file).read_text())
        rows.append([f"{value:g}", f"{manifest[count]:,} of {manifest['region_elements']:,}", folder])
    knob = "ratio (%)" if restore else METHODS[config.method].knob
    print(markdown_table([knob, f"{count} elements", "folder"], rows, "rrl"))
    print(f"{len(folders)} {'restored' if restore else config.method} models in {time.perf_counter() - start:.1f}s")


def _run_restore(args: argparse.Namespace) -> None:
    args.values = args.ratios
    _run_sweep(args, as_repair(config_from_args(RestoreConfig, args)))


def _run_repair(args: argparse.Namespace) -> None:
    config = config_from_args(RepairConfig, args)
    read = METHODS[config.method].settings
    if args.values is None:
        args.values = METHODS[config.method].default_values
        if not args.values:
            raise SftlensError(f"--method {config.method} needs --values (only "
                               f"{', '.join(m for m, spec in METHODS.items() if spec.default_values)} has a default)")
    unused = [name for name in ("metric", "scope", "strategy", "seed") if name in vars(args) and name not in read]
    if unused:
        raise SftlensError(f"--{unused[0]} does not apply to --method {config.method} "
                           f"(it reads {', '.join('--' + n for n in read)})")
    _run_sweep(args, config)


def _values(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x.strip())


def _add_eval_arguments(parser, what: str) -> None:
    parser.add_argument("--eval", action="store_true",
                        help=f"evaluate the fine-tuned model and every {what} model in memory instead of writing "
                             "checkpoints (Table 4 on --test, Table 5 on --train)")
    parser.add_argument("--test", nargs="+", metavar="FILE", help="split JSONL test files for --eval")
    parser.add_argument("--train", metavar="FILE", help="the model's training JSONL, for --eval (Table 5)")
    add_config_arguments(parser, EvalConfig)


def _add_models(parser, what: str) -> None:
    parser.add_argument("--base", required=True, help="base model (built-in name or folder)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (built-in name or folder)")
    parser.add_argument("--out", required=True, help=f"folder receiving one {what} model per value "
                                                     "(with --eval: the evaluation records)")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("restore", help="restore the most changed parameters to their base values")
    _add_models(parser, "restored")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, type=_values,
                        help="comma list of percentages (default: 1,3,5,10,20,40,60)")
    add_config_arguments(parser, RestoreConfig)
    _add_eval_arguments(parser, "restored")
    parser.set_defaults(func=_run_restore, writes="out")

    parser = subparsers.add_parser(
        "repair", help="undo SFT's harm in weight space: restore, wise (WiSE-FT), dare (DARE), trim (TIES' trim), "
                       "spectral (Gavish-Donoho)")
    _add_models(parser, "repaired")
    parser.add_argument("--method", required=True, choices=tuple(METHODS),
                        help="; ".join(f"{name}: {m.knob} in {m.interval}" for name, m in METHODS.items()))
    parser.add_argument("--values", type=_values,
                        help="comma list of the method's knob (restore: ratios in %%, wise: alpha, dare: p, trim: d in %%, "
                             "spectral: c, the scale of the Gavish-Donoho threshold; spectral's default: 1, the "
                             "threshold itself; the other methods need --values)")
    add_config_arguments(parser, RepairConfig, exclude=("method",))
    _add_eval_arguments(parser, "repaired")
    parser.set_defaults(func=_run_repair, writes="out")
