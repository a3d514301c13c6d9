"""Applying an `Edit`: as HF folders sharded like the fine-tuned input, or in place in a loaded model.

Writing is one pass over the shards for all values of a sweep: every block of rows of a tensor is
read once, and each value's edited block is written straight into that value's output shard at
its place (each output shard starts with its input's header: same tensors, offsets, metadata), so
peak memory is a few copies of one block whatever the size of the model, its shards or its
largest tensor. safetensors' `save_file` would need each whole output shard in memory.

Every value's folder is written atomically and keyed by its inputs (file sizes and times of both
checkpoints, the method's settings, the value), so a re-run skips finished values. Folders are
`{method}-{value:g}` (restore: `{strategy}-{ratio:g}`, the paper's), each with the config,
tokenizer and shard index of the fine-tuned folder and a record of what was reset per tensor
(restore: restore.json / restored.tsv; the others: repair.json / repaired.tsv).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sftlens.errors import SftlensError
from sftlens.io import KeyedOutput, atomic_write_json, atomic_write_text, stable_hash
from sftlens.models import LOSS_FILE, RUN_FILE
from sftlens.weights.checkpoints import (
    Checkpoint,
    CheckpointPair,
    assert_finite,
    open_pair,
    tensors_by_checkpoint_name,
)
from sftlens.weights.methods import Edit, RepairConfig, method_of, parse_values

_RECORDS = {"restore": ("restore.json", "restored.tsv", "restored")}
_REPAIR_RECORDS = ("repair.json", "repaired.tsv", "reset")


def record_names(method: str) -> tuple[str, str, str]:
    """(manifest file, per-tensor table file, name of the count) of a method's folders."""
    return _RECORDS.get(method, _REPAIR_RECORDS)


def value_folder(out_root: str | Path, config: RepairConfig, value: float) -> Path:
    prefix = config.strategy if config.method == "restore" else config.method
    return Path(out_root) / f"{prefix}-{value:g}"


def _signature(ckpt: Checkpoint) -> list:
    files = [ckpt.root / s for s in ckpt.shards]
    return [str(ckpt.root.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def sweep_key(pair: CheckpointPair, config: RepairConfig, value: float) -> str:
    """The key of one value's output (restore keeps the key of `sftlens restore`'s folders)."""
    inputs = {"base": _signature(pair.base), "finetuned": _signature(pair.finetuned), "config": config.settings()}
    if config.method == "restore":
        return stable_hash({**inputs, "ratio": value})
    return stable_hash({**inputs, "method": config.method, "value": value})


def _output(folder: Path, manifest: str, key: str) -> KeyedOutput:
    """A value's folder: its manifest holds the key; a folder with another key (or anything else) is redone."""
    return KeyedOutput(folder, key, manifest, stale="redo")


def _check_outputs(pair: CheckpointPair, targets: list[Path]) -> None:
    """Never write into (or over) a source checkpoint; `targets` = out_root, then value folders."""
    out_root, *folders = (t.resolve() for t in targets)
    for ckpt in (pair.base, pair.finetuned):
        source = ckpt.root.resolve()
        # a value folder is replaced as a whole, so it must not contain a source either
        clashes = [out_root] if out_root == source or source in out_root.parents else []
        clashes += [f for f in folders if f == source or source in f.parents or f in source.parents]
        if clashes:
            raise SftlensError(f"output folder {clashes[0]} overlaps the input checkpoint {source}; "
                               "choose another --out")


def _copy_side_files(source: Path, dest: Path) -> None:
    """Config, tokenizer, generation config and the shard index: everything but the weights and
    the source's own records (a fine-tuning run's describe the run, not the edited model)."""
    skipped = {RUN_FILE, LOSS_FILE, *record_names("restore")[:2], *_REPAIR_RECORDS[:2]}
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix not in (".safetensors", ".bin") and path.name not in skipped:
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


def _edited_blocks(pair: CheckpointPair, edit: Edit, name: str,
                   region: set[str]) -> Iterator[tuple[int, list[torch.Tensor], list[int]]]:
    """(byte offset in the tensor, each value's block, each value's reset count) for every block
    of rows of `name`; outside the region every value gets the fine-tuned block."""
    n_values = len(edit.values)
    if name not in region:
        ft = pair.finetuned
        for offset, block in ft.blocks(name):
            assert_finite(ft, name, block)
            yield offset * block.element_size(), [block] * n_values, [0] * n_values
        return
    for chunk, blocks, counts in edit.tensor(name, range(n_values)):
        yield chunk.offset * chunk.finetuned.element_size(), blocks, counts


def _as_bytes(tensor: torch.Tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_shards(pair: CheckpointPair, edit: Edit, folders: list[Path], progress: bool) -> list[dict[str, int]]:
    """Write every value's shards into `folders` (one per value of `edit`) in one pass; return,
    per value, the number of elements reset to base of each region tensor."""
    from tqdm.auto import tqdm

    ft = pair.finetuned
    region = set(edit.names)
    counts: list[dict[str, int]] = [dict.fromkeys(edit.names, 0) for _ in folders]
    bar = tqdm(total=len(ft.shard_of), desc="writing edited shards", unit="tensor", disable=not progress)
    for shard in ft.shards:
        header, spans = _read_header(ft.root / shard)
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(folder / shard, "wb")) for folder in folders]
            for out in outs:
                out.write(header)
            for name in sorted(spans, key=spans.__getitem__):
                for position, blocks, block_counts in _edited_blocks(pair, edit, name, region):
                    for i, (out, block) in enumerate(zip(outs, blocks)):
                        out.seek(spans[name][0] + position)
                        out.write(_as_bytes(block))
                        if name in region:
                            counts[i][name] += block_counts[i]
                bar.update()
    bar.close()
    return counts


def _manifest(pair: CheckpointPair, edit: Edit, config: RepairConfig, i: int, counts: dict[str, int],
              key: str, seconds: float) -> dict:
    count = record_names(config.method)[2]
    what = ({"ratio": edit.values[i]} if config.method == "restore"
            else {"method": config.method, method_of(config.method).knob: edit.values[i]})
    numel = {name: pair.numel(name) for name in edit.names}
    return {
        "key": key, "base": str(pair.base.root), "finetuned": str(pair.finetuned.root),
        **what, "config": config.settings(),
        "region_elements": sum(numel.values()), count: sum(counts.values()),
        "tensors": {name: {"numel": numel[name], count: counts[name]} for name in edit.names},
        "passes": edit.passes + 1, "seconds": round(seconds, 3),
    }


def _table(manifest: dict, count: str) -> str:
    lines = [f"name\tnumel\t{count}\tfraction"]
    for name, t in manifest["tensors"].items():
        lines.append(f"{name}\t{t['numel']}\t{t[count]}\t{t[count] / max(t['numel'], 1):.6f}")
    return "\n".join(lines) + "\n"


def repair_sweep(base, finetuned, values, config: RepairConfig, out_root: str | Path,
                 progress: bool = True) -> dict[float, Path]:
    """Write one edited HF folder per value under `out_root` (see the module doc); finished values
    are skipped, the others written in one pass after the method's own passes (if any)."""
    start = time.perf_counter()
    method = method_of(config.method)
    values = parse_values(config.method, values)
    pair = open_pair(base, finetuned)
    folders = {v: value_folder(out_root, config, v) for v in values}
    _check_outputs(pair, [Path(out_root), *folders.values()])
    manifest_file, table_file, count = record_names(config.method)
    keys = {v: sweep_key(pair, config, v) for v in values}
    outputs = {v: _output(folders[v], manifest_file, keys[v]) for v in values}
    todo = tuple(v for v in values if not (outputs[v].done() and (folders[v] / "config.json").is_file()))
    if not todo:
        return folders
    edit = method.edit(pair, todo, config, progress)
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(outputs[v].writing()) for v in todo]
        counts = write_shards(pair, edit, temps, progress)
        for i, (v, tmp) in enumerate(zip(todo, temps)):
            _copy_side_files(pair.finetuned.root, tmp)
            manifest = _manifest(pair, edit, config, i, counts[i], keys[v], time.perf_counter() - start)
            atomic_write_json(tmp / manifest_file, manifest)
            atomic_write_text(tmp / table_file, _table(manifest, count))
    return folders


def apply_in_memory(model, pair: CheckpointPair, edit: Edit, i: int):
    """Write value i of `edit` into the region tensors of a loaded fine-tuned `model` (in place;
    returned). Every region tensor is rewritten from the two checkpoints, so calls for different
    values can follow each other on the same model; the other tensors are left as they are."""
    state = tensors_by_checkpoint_name(model)
    missing = [n for n in edit.names if n not in state]
    if missing:
        raise SftlensError(f"the model has no tensor {missing[0]} of {pair.finetuned.root}")
    with torch.no_grad():
        for name in edit.names:
            for chunk, (block,), _ in edit.tensor(name, (i,)):
                target = state[name] if chunk.rows is None else state[name][chunk.rows[0]:chunk.rows[1]]
                target.copy_(block)
    return model


def repaired_models(model, base, finetuned, values, config: RepairConfig,
                    progress: bool = True) -> Iterator[tuple[float, object]]:
    """Yield (value, `model` edited in place at that value) for a whole sweep, sharing the method's
    passes (restore's and trim's selection); the model is left at the last value."""
    values = parse_values(config.method, values)
    pair = open_pair(base, finetuned)
    edit = method_of(config.method).edit(pair, values, config, progress)
    for i, value in enumerate(values):
        yield value, apply_in_memory(model, pair, edit, i)
