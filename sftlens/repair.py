"""Stage: repairs of a fine-tuned model in weight space (restore, wise, dare, trim, spectral, guided), as
the `repair` CLI: one HF folder per value of the method's knob, or every value evaluated in memory.

The editing lives in `sftlens.weights` (one pass for a whole sweep, folders keyed by their inputs);
scoring a model on split files lives in `sftlens.evaluate`. `sftlens restore` is this stage for the
paper's method under its own name (`sftlens.restore`).

`evaluate_repaired(base, ft, values, RepairConfig, test_files, out_dir, eval_config, train_file)` ->
records with `split` (test/train) and the value's field (`value_field`: restore `restore_ratio` with
`strategy`, ratio 0 = unrestored; the others `method` and `repair_value`; the neutral value = the
unedited model), each value's cached in `out/eval/{folder name}.json` (a `KeyedOutput`; a cache from
before `repair_value` holds `value` and reads back retagged); `repair_table` (Tables 4/5).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sftlens.config import add_config_arguments, config_from_args, keyed_dict
from sftlens.errors import SftlensError
from sftlens.evaluate import EvalConfig, acc_of, evaluate_splits, load_test_rows
from sftlens.io import KeyedOutput, atomic_write_text, stable_hash
from sftlens.markdown import markdown_table
from sftlens.models import load_model
from sftlens.weights import (
    METHODS,
    RepairConfig,
    open_pair,
    parse_values,
    record_names,
    repair_sweep,
    repaired_models,
    sweep_key,
    value_folder,
)


def _eval_sets(test_files, train_file) -> dict[str, tuple[list[dict], list[dict]]]:
    if not test_files:
        raise SftlensError("--eval needs --test FILE [FILE ...]")
    sets = {"test": load_test_rows(list(test_files))}
    if train_file:
        sets["train"] = load_test_rows([train_file])
    return sets


def value_field(method: str) -> str:
    """The record field that holds a knob's value: restore's is the paper's `restore_ratio` (as in
    studies), every other method's `repair_value` (as in studies' repair units)."""
    return "restore_ratio" if method == "restore" else "repair_value"


def _tag(config: RepairConfig, value: float) -> dict:
    """What marks a value's evaluation records: its field, and restore's strategy or the method."""
    if config.method == "restore":
        return {value_field("restore"): value, "strategy": config.strategy}
    return {"method": config.method, value_field(config.method): value}


def _retagged(records: list[dict], config: RepairConfig, value: float) -> list[dict]:
    """Cached records with today's tag: caches written before the field was `repair_value` hold `value`."""
    return [{**{k: x for k, x in rec.items() if k != "value"}, **_tag(config, value)} for rec in records]


def evaluate_repaired(base, finetuned, values, config: RepairConfig, test_files=(), out_dir: str | Path = "repaired",
                      eval_config=None, train_file=None, progress: bool = True) -> list[dict]:
    """Accuracy of the fine-tuned model as it is (the method's neutral value: restore ratio 0,
    wise alpha 1, dare p 0, trim d 100, spectral c 0, guided k 0) and edited at every value, editing in memory (no checkpoint
    written): the paper's Table 4 on `test_files`, Table 5 on `train_file`.

    Returns long-format evaluation records with `split` (test/train) and the value's tag (restore:
    `restore_ratio`, `strategy`; the others: `method`, `repair_value`); each value's records are cached in
    out_dir/eval/ by inputs, so a re-run skips finished values."""
    eval_config = eval_config or EvalConfig()
    sets = _eval_sets(test_files, train_file)
    pair = open_pair(base, finetuned)
    neutral = METHODS[config.method].neutral
    sweep = tuple(sorted({neutral, *parse_values(config.method, values)}))
    settings = keyed_dict(eval_config)
    manifests = {name: manifest for name, (_, manifest) in sets.items()}
    # "restore" labels the edit's key for every method: restore's cached evaluations keep their keys
    keys = {v: stable_hash({"format": 2, "restore": sweep_key(pair, config, v), "sets": manifests, "eval": settings})
            for v in sweep}
    caches = {v: KeyedOutput(Path(out_dir) / "eval" / f"{value_folder(out_dir, config, v).name}.json", keys[v],
                             stale="redo") for v in sweep}
    done = {v: _retagged(cached["records"], config, v) for v in sweep if (cached := caches[v].finished())}
    todo = [v for v in sweep if v not in done]
    if todo:
        model, tokenizer = load_model(str(finetuned), dtype=eval_config.dtype, device=eval_config.device)

        def run(value: float) -> None:
            records, _ = evaluate_splits(model, tokenizer, {name: rows for name, (rows, _) in sets.items()}, eval_config,
                                         _tag(config, value), progress)
            caches[value].write({"records": records})
            done[value] = records

        if neutral in todo:  # the model as loaded
            todo.remove(neutral)
            run(neutral)
        if todo:
            for value, _ in repaired_models(model, base, finetuned, todo, config, progress):
                run(value)
    return [rec for v in sweep for rec in done[v]]


def repair_table(records: list[dict], method: str = "restore") -> str:
    """Markdown, Table 4/5 layout: one row per value of the method's knob, the paper's Acc (%) per
    set and domain, with the change against the unedited model (the neutral value)."""
    column = value_field(method)
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


def run_sweep(args: argparse.Namespace, config: RepairConfig) -> None:
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
        print(f"evaluated {len({r[value_field(config.method)] for r in records})} models in memory "
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


def _run_repair(args: argparse.Namespace) -> None:
    config = config_from_args(RepairConfig, args)
    read = METHODS[config.method].settings
    if args.values is None:
        args.values = METHODS[config.method].default_values
        if not args.values:
            raise SftlensError(f"--method {config.method} needs --values (only "
                               f"{', '.join(m for m, spec in METHODS.items() if spec.default_values)} has a default)")
    unused = [name for name in ("metric", "scope", "strategy", "seed", "importances")
              if name in vars(args) and name not in read]
    if unused:
        raise SftlensError(f"--{unused[0]} does not apply to --method {config.method} "
                           f"(it reads {', '.join('--' + n for n in read)})")
    if "importances" in read:
        config.importances_file()  # given, and an importances file: a one-line error before anything runs
    run_sweep(args, config)


def parse_value_list(text: str) -> tuple[str, ...]:
    """A comma list of values as given (each parsed, range-checked, by `parse_values`)."""
    return tuple(x for x in text.split(",") if x.strip())


def add_eval_arguments(parser, what: str) -> None:
    parser.add_argument("--eval", action="store_true",
                        help=f"evaluate the fine-tuned model and every {what} model in memory instead of writing "
                             "checkpoints (Table 4 on --test, Table 5 on --train)")
    parser.add_argument("--test", nargs="+", metavar="FILE", help="split JSONL test files for --eval")
    parser.add_argument("--train", metavar="FILE", help="the model's training JSONL, for --eval (Table 5)")
    add_config_arguments(parser, EvalConfig)


def add_model_arguments(parser, what: str) -> None:
    parser.add_argument("--base", required=True, help="base model (built-in name or folder)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (built-in name or folder)")
    parser.add_argument("--out", required=True, help=f"folder receiving one {what} model per value "
                                                     "(with --eval: the evaluation records)")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "repair", help="undo SFT's harm in weight space: restore, wise (WiSE-FT), dare (DARE), trim (TIES' trim), "
                       "spectral (Gavish-Donoho), guided (fact importances)")
    add_model_arguments(parser, "repaired")
    parser.add_argument("--method", required=True, choices=tuple(METHODS),
                        help="; ".join(f"{name}: {m.knob} in {m.interval}" for name, m in METHODS.items()))
    parser.add_argument("--values", type=parse_value_list,
                        help="comma list of the method's knob (restore: ratios in %%, wise: alpha, dare: p, trim: d in %%, "
                             "spectral: c, the scale of the Gavish-Donoho threshold, guided: k in %%; spectral's "
                             "default: 1, the threshold itself; the other methods need --values)")
    add_config_arguments(parser, RepairConfig, exclude=("method",))
    add_eval_arguments(parser, "repaired")
    parser.set_defaults(func=_run_repair, writes="out")
