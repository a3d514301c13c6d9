"""Parameter restoration (paper Section 5.1): set the selected elements of a fine-tuned model back
to their base values, for a whole sweep of ratios in one run.

The selection (strategy top/bottom/random, metric relative/absolute, scope global/tensor, region)
is the exact streamed one of `sftlens.analysis.deltas`: exactly floor(n * k / 100) elements, ties
broken by sorted tensor name, then flat index. Writing is one more pass over the shards, for all
ratios at once: every block of rows of a tensor is read once, and each ratio's restored block is
written straight into that ratio's output shard, so peak memory is a few copies of one block
(`CHUNK_ELEMENTS`), whatever the size of the model, of its shards or of its largest tensor.

Every ratio's folder is written atomically and keyed by its inputs (file sizes and times of both
checkpoints, the selection settings, the ratio), so a re-run skips finished ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sftlens.analysis.deltas import (
    DEFAULT_RATIOS,
    Checkpoint,
    CheckpointPair,
    Selection,
    SelectionConfig,
    assert_finite,
    open_pair,
    parse_ratios,
    select,
    tensor_keys,
)
from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.errors import SftlensError
from sftlens.evaluate import RESULT_NEUTRAL, EvalConfig, acc_of, evaluate_model, load_test_rows, summarize
from sftlens.io import atomic_directory, atomic_write_json, atomic_write_text, stable_hash
from sftlens.markdown import markdown_table
from sftlens.models import load_model
from sftlens.train import LOSS_FILE, RUN_FILE

MANIFEST = "restore.json"
TABLE = "restored.tsv"


@dataclass(frozen=True)
class RestoreConfig(SelectionConfig):
    """Which fine-tuned elements go back to their base values (defaults: the paper's)."""


def ratio_folder(out_root: str | Path, config: RestoreConfig, ratio: float) -> Path:
    return Path(out_root) / f"{config.strategy}-{ratio:g}"


def _signature(ckpt: Checkpoint) -> list:
    files = [ckpt.root / s for s in ckpt.shards]
    return [str(ckpt.root.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _key(pair: CheckpointPair, config: RestoreConfig, ratio: float) -> str:
    return stable_hash({"base": _signature(pair.base), "finetuned": _signature(pair.finetuned),
                        "config": config_to_dict(config), "ratio": ratio})


def _is_done(folder: Path, key: str) -> bool:
    manifest = folder / MANIFEST
    if not (manifest.is_file() and (folder / "config.json").is_file()):
        return False
    with contextlib.suppress(json.JSONDecodeError, KeyError):
        return json.loads(manifest.read_text())["key"] == key
    return False


def _check_outputs(pair: CheckpointPair, targets: list[Path]) -> None:
    """Never write into (or over) a source checkpoint; `targets` = out_root, then ratio folders."""
    out_root, *folders = (t.resolve() for t in targets)
    for ckpt in (pair.base, pair.finetuned):
        source = ckpt.root.resolve()
        # a ratio folder is replaced as a whole, so it must not contain a source either
        clashes = [out_root] if out_root == source or source in out_root.parents else []
        clashes += [f for f in folders if f == source or source in f.parents or f in source.parents]
        if clashes:
            raise SftlensError(f"output folder {clashes[0]} overlaps the input checkpoint {source}; "
                               "choose another --out")


def _copy_side_files(source: Path, dest: Path) -> None:
    """Config, tokenizer, generation config and the shard index: everything but the weights and
    the source's own records (they describe the fine-tuning run, not the restored model)."""
    records = (MANIFEST, TABLE, RUN_FILE, LOSS_FILE)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix not in (".safetensors", ".bin") and path.name not in records:
            shutil.copy2(path, dest / path.name)


def _read_header(path: Path) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors file's header as raw bytes (length prefix included) and each tensor's byte
    range in the file. Format: 8-byte little-endian header size, JSON header (data_offsets count
    from the header's end), then the tensors' bytes. The file was already validated by safe_open."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
    data_start = 8 + size
    spans = {name: (data_start + info["data_offsets"][0], data_start + info["data_offsets"][1])
             for name, info in json.loads(raw).items() if name != "__metadata__"}
    return size.to_bytes(8, "little") + raw, spans


def _restored_blocks(pair: CheckpointPair, selection: Selection, name: str,
                     n_ratios: int) -> Iterator[tuple[int, list[torch.Tensor], list[int]]]:
    """(byte offset in the tensor, each ratio's restored block, each ratio's restored count) for
    every block of rows of `name`; outside the region every ratio gets the fine-tuned block."""
    if name not in selection.numel:
        ft = pair.finetuned
        for offset, block in ft.blocks(name):
            assert_finite(ft, name, block)
            yield offset * block.element_size(), [block] * n_ratios, [0] * n_ratios
        return
    cutter = selection.cutter(name)
    for chunk, _, keys in tensor_keys(pair, name, selection.config):
        masks = cutter.masks(keys)
        yield chunk.offset * chunk.finetuned.element_size(), \
            [torch.where(mask, chunk.base, chunk.finetuned) for mask in masks], \
            [int(torch.count_nonzero(mask)) for mask in masks]


def _as_bytes(tensor: torch.Tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_shards(pair: CheckpointPair, selection: Selection, folders: list[Path],
                  progress: bool) -> list[dict[str, int]]:
    """Write every ratio's shards into `folders` (one per ratio of `selection`) in one pass; return,
    per ratio, the number of restored elements of each region tensor.

    Each output shard starts with its input shard's header (same tensors, offsets and metadata),
    and every restored block is written at its place: safetensors' save_file would need the whole
    output shard in memory (twice, while serialising) for each ratio."""
    from tqdm.auto import tqdm

    ft = pair.finetuned
    n_ratios = len(folders)
    restored: list[dict[str, int]] = [dict.fromkeys(selection.names, 0) for _ in folders]
    bar = tqdm(total=len(ft.shard_of), desc="writing restored shards", unit="tensor", disable=not progress)
    for shard in ft.shards:
        header, spans = _read_header(ft.root / shard)
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(folder / shard, "wb")) for folder in folders]
            for out in outs:
                out.write(header)
            for name in sorted(spans, key=spans.__getitem__):
                for position, blocks, counts in _restored_blocks(pair, selection, name, n_ratios):
                    for i, (out, block) in enumerate(zip(outs, blocks)):
                        out.seek(spans[name][0] + position)
                        out.write(_as_bytes(block))
                        if name in restored[i]:
                            restored[i][name] += counts[i]
                bar.update()
    bar.close()
    return restored


def _manifest(pair: CheckpointPair, selection: Selection, i: int, restored: dict[str, int], key: str,
              seconds: float) -> dict:
    return {
        "key": key, "base": str(pair.base.root), "finetuned": str(pair.finetuned.root),
        "ratio": selection.ratios[i], "config": config_to_dict(selection.config),
        "region_elements": selection.total, "restored": sum(restored.values()),
        "tensors": {name: {"numel": selection.numel[name], "restored": restored[name]} for name in selection.names},
        "passes": selection.passes + 1, "seconds": round(seconds, 3),
    }


def _table(manifest: dict) -> str:
    lines = ["name\tnumel\trestored\tfraction"]
    for name, t in manifest["tensors"].items():
        lines.append(f"{name}\t{t['numel']}\t{t['restored']}\t{t['restored'] / max(t['numel'], 1):.6f}")
    return "\n".join(lines) + "\n"


def restore_sweep(base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                  out_root: str | Path = "restored", progress: bool = True) -> dict[float, Path]:
    """Write one restored HF folder per ratio under `out_root` (named `{strategy}-{ratio}`), each
    sharded like the fine-tuned input, with its config/tokenizer and a record of what was restored
    per tensor (restore.json, restored.tsv). Finished ratios are skipped."""
    start = time.perf_counter()
    ratios = parse_ratios(ratios)
    pair = open_pair(base, finetuned)
    folders = {r: ratio_folder(out_root, config, r) for r in ratios}
    _check_outputs(pair, [Path(out_root), *folders.values()])
    keys = {r: _key(pair, config, r) for r in ratios}
    todo = tuple(r for r in ratios if not _is_done(folders[r], keys[r]))
    if not todo:
        return folders
    selection = select(pair, todo, config, progress)
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(atomic_directory(folders[r])) for r in todo]
        restored = _write_shards(pair, selection, temps, progress)
        for i, (r, tmp) in enumerate(zip(todo, temps)):
            _copy_side_files(pair.finetuned.root, tmp)
            manifest = _manifest(pair, selection, i, restored[i], keys[r], time.perf_counter() - start)
            atomic_write_json(tmp / MANIFEST, manifest)
            atomic_write_text(tmp / TABLE, _table(manifest))
    return folders


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
    i = selection.ratios.index(ratio)
    state = model.state_dict()
    missing = [n for n in selection.names if n not in state]
    if missing:
        raise SftlensError(f"the model has no tensor {missing[0]} of {pair.finetuned.root}")
    with torch.no_grad():
        for name in selection.names:
            cutter = selection.cutter(name)
            for chunk, _, keys in tensor_keys(pair, name, selection.config):
                target = state[name] if chunk.rows is None else state[name][chunk.rows[0]:chunk.rows[1]]
                target.copy_(torch.where(cutter.mask(i, keys), chunk.base, chunk.finetuned))
    return model


def restored_models(model, base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                    progress: bool = True) -> Iterator[tuple[float, object]]:
    """Yield (ratio, model restored in place at that ratio) for a whole sweep, sharing one selection;
    the model is left restored at the last ratio."""
    selection = select(open_pair(base, finetuned), ratios, config, progress)
    for ratio in selection.ratios:
        yield ratio, restore_in_memory(model, base, finetuned, ratio, config, selection)


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


def evaluate_restored(base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                      test_files=(), out_dir: str | Path = "restored", eval_config=None, train_file=None,
                      progress: bool = True) -> list[dict]:
    """Accuracy of the fine-tuned model unrestored (ratio 0) and restored at every ratio, restoring
    in memory (no checkpoint written): the paper's Table 4 on `test_files`, Table 5 on `train_file`.

    Returns long-format evaluation records with `split` (test/train), `restore_ratio` and `strategy`;
    each ratio's records are cached in out_dir/eval/ by inputs, so a re-run skips finished ratios."""
    eval_config = eval_config or EvalConfig()
    sets = _eval_sets(test_files, train_file)
    pair = open_pair(base, finetuned)
    levels = (0.0, *parse_ratios(ratios))
    settings = {k: v for k, v in config_to_dict(eval_config).items() if k not in RESULT_NEUTRAL}
    manifests = {name: manifest for name, (_, manifest) in sets.items()}
    keys = {r: stable_hash({"format": 2, "restore": _key(pair, config, r), "sets": manifests, "eval": settings})
            for r in levels}
    paths = {r: Path(out_dir) / "eval" / f"{config.strategy}-{r:g}.json" for r in levels}
    done = {}
    for r in levels:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            cached = json.loads(paths[r].read_text())
            if cached["key"] == keys[r]:
                done[r] = cached["records"]
    todo = [r for r in levels if r not in done]
    if todo:
        model, tokenizer = load_model(str(finetuned), dtype=eval_config.dtype, device=eval_config.device)

        def run(ratio: float) -> None:
            records, _ = evaluate_splits(model, tokenizer, {name: rows for name, (rows, _) in sets.items()}, eval_config,
                                         {"restore_ratio": ratio, "strategy": config.strategy}, progress)
            atomic_write_json(paths[ratio], {"key": keys[ratio], "records": records})
            done[ratio] = records

        if todo[0] == 0.0:
            run(todo.pop(0))
        if todo:
            for ratio, _ in restored_models(model, base, finetuned, todo, config, progress):
                run(ratio)
    return [rec for r in levels for rec in done[r]]


def restore_table(records: list[dict]) -> str:
    """Markdown, Table 4/5 layout: one row per restore ratio, the paper's Acc (%) per set and domain,
    with the change against the unrestored model."""
    columns = sorted({(r["split"], r["domain"]) for r in records}, key=lambda c: (c[0] != "test", c[1]))
    ratios = sorted({r["restore_ratio"] for r in records})

    def acc(ratio: float, column: tuple[str, str]) -> float:
        part = [r for r in records if r["restore_ratio"] == ratio and r["split"] == column[0]]
        return 100 * acc_of(part, column[1])

    rows = [[f"{ratio:g}", *(f"{acc(ratio, c):.2f}" + (f" ({acc(ratio, c) - acc(0.0, c):+.2f})" if ratio and 0.0 in ratios else "")
                              for c in columns)] for ratio in ratios]
    return markdown_table(["restore (%)", *(f"{s} {d} Acc" for s, d in columns)], rows, "r" * (len(columns) + 1))


def _run_restore(args: argparse.Namespace) -> None:
    config = config_from_args(RestoreConfig, args)
    start = time.perf_counter()
    if args.eval:
        records = evaluate_restored(args.base, args.finetuned, args.ratios, config, args.test or (), args.out,
                                    config_from_args(EvalConfig, args), args.train)
        table = restore_table(records)
        atomic_write_text(Path(args.out) / "eval" / f"{config.strategy}-table.md", table + "\n")
        print(table)
        print(f"evaluated {len({r['restore_ratio'] for r in records})} models in memory "
              f"in {time.perf_counter() - start:.1f}s")
        return
    folders = restore_sweep(args.base, args.finetuned, args.ratios, config, args.out)
    rows = []
    for ratio, folder in folders.items():
        manifest = json.loads((folder / MANIFEST).read_text())
        rows.append([f"{ratio:g}", f"{manifest['restored']:,} of {manifest['region_elements']:,}", folder])
    print(markdown_table(["ratio (%)", "restored elements", "folder"], rows, "rrl"))
    print(f"{len(folders)} restored models in {time.perf_counter() - start:.1f}s")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("restore", help="restore the most changed parameters to their base values")
    parser.add_argument("--base", required=True, help="base model (built-in name or folder)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (built-in name or folder)")
    parser.add_argument("--out", required=True, help="folder receiving one restored model per ratio "
                                                     "(with --eval: the evaluation records)")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS,
                        type=lambda s: tuple(x for x in s.split(",") if x.strip()),
                        help="comma list of percentages (default: 1,3,5,10,20,40,60)")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate the unrestored and every restored model in memory instead of writing "
                             "checkpoints (Table 4 on --test, Table 5 on --train)")
    parser.add_argument("--test", nargs="+", metavar="FILE", help="split JSONL test files for --eval")
    parser.add_argument("--train", metavar="FILE", help="the model's training JSONL, for --eval (Table 5)")
    add_config_arguments(parser, RestoreConfig)
    add_config_arguments(parser, EvalConfig)
    parser.set_defaults(func=_run_restore, writes="out")
