"""The resumable, multi-rank probe store: `probe.json` (model fingerprint and keyed settings; a store
written with other settings is an error) and one append-only `records-rank{R}.jsonl` per process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from sftlens.data import Fact
from sftlens.errors import SftlensError
from sftlens.io import JsonlAppender, atomic_write_json, exclusive_writer, read_jsonl, stable_hash
from sftlens.models import load_model, model_fingerprint
from sftlens.probe.batching import CUDA_START_PROMPTS
from sftlens.probe.records import ProbeConfig, ProbeRecord
from sftlens.probe.sampling import probe_facts, template_indices
from sftlens.taught import held_out_templates

STORE_FORMAT = 1
META_FILE = "probe.json"


# Since question-only topics are probed as asked, a newline ends a sample only after its first text. The rule is
# not in the key (stores and study units made before it keep their keys and are reused whole); a store written
# under the old rule, which lacks this mark, is refused when facts are left to add to it, so no store mixes rules.
NEWLINE_RULE = {"newline_rule": "after-text"}


def store_meta(model: str, fingerprint: str, config: ProbeConfig, device: str = "cpu") -> dict:
    settings = config.keyed_settings(device)
    return {"format": STORE_FORMAT, "model": model, "fingerprint": fingerprint, "settings": settings,
            "key": stable_hash([fingerprint, settings]), **(NEWLINE_RULE if config.stop_at_newline else {})}


def _open_store(store_dir: Path, meta: dict) -> None:
    meta_path = store_dir / META_FILE
    if meta_path.is_file():
        existing = read_store_meta(store_dir)
        if existing.get("key") != meta["key"]:
            raise SftlensError(f"{meta_path}: store was written {_difference(existing, meta)}; use another --store")
        return
    if store_dir.is_dir() and any(store_dir.glob("records-*.jsonl")):
        raise SftlensError(f"{store_dir}: probe records without {META_FILE}; not a probe store")
    atomic_write_json(meta_path, meta)


def _difference(existing: dict, wanted: dict) -> str:
    if existing.get("fingerprint") != wanted["fingerprint"]:
        return f"for another model ({existing.get('model')}, fingerprint {existing.get('fingerprint')})"
    old, new = existing.get("settings", {}), wanted["settings"]
    diffs = [f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "with other settings: " + ", ".join(diffs or ["format"])


def read_store_meta(store_dir: Path) -> dict:
    """A store's `probe.json` (model, fingerprint, keyed settings, key), checked."""
    path = store_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SftlensError(f"{path}: cannot read probe store metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise SftlensError(f"{path}: not a probe store of format {STORE_FORMAT}")
    return meta


def _shard_files(store: Path) -> list[Path]:
    return sorted(store.glob("records-*.jsonl")) if store.is_dir() else [store]


def load_probe(store: str | os.PathLike, model: str | None = None, config: ProbeConfig | None = None) -> dict[str, ProbeRecord]:
    """Every record of a probe store (all rank files merged), or of one records file.

    With `model` and `config`, a store written for another model or other settings is an error.
    """
    store = Path(store)
    if not store.exists():
        raise SftlensError(f"{store}: no such probe store")
    if store.is_dir():
        meta = read_store_meta(store)
        if model is not None and config is not None:
            wanted = store_meta(model, model_fingerprint(model), config, probe_device())
            if meta["key"] != wanted["key"]:
                raise SftlensError(f"{store / META_FILE}: store was written {_difference(meta, wanted)}")
    records: dict[str, ProbeRecord] = {}
    for path in _shard_files(store):
        try:
            rows = read_jsonl(path)
        except (OSError, ValueError) as err:
            raise SftlensError(f"{path}: cannot read probe records ({err})") from None
        for row in rows:
            record = ProbeRecord.from_row(row, str(path))
            records.setdefault(record.fact_id, record)
    return records


def _state():
    from accelerate import PartialState

    # Without a GPU, accelerate only forms a process group (gloo) when told it runs on CPU; that
    # is how `torchrun --nproc_per_node N -m sftlens probe` shares work on a CPU machine.
    return PartialState(cpu=not torch.cuda.is_available())


def process_shard() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` or `torchrun`; (0, 1) for a plain process."""
    state = _state()
    return state.process_index, state.num_processes


def probe_device() -> str:
    return str(_state().device)


def run_probe(
    model: str, facts: list[Fact], config: ProbeConfig, store_dir: str | os.PathLike, progress: bool = True,
    *, shard: tuple[int, int] | None = None, device: str | None = None,
) -> dict[str, ProbeRecord]:
    """Probe `facts` into `store_dir`, skipping facts already there; return the records of `facts`.

    Under `accelerate launch`, rank r of w probes every w-th fact (in id order) and writes its own
    records file; all ranks wait for each other and return the merged records. `shard` sets
    (rank, world) explicitly instead (ranks run one after another then see only finished shards).
    `device` overrides the process's accelerate device (e.g. "cpu" on a GPU machine).
    """
    if not facts:
        raise SftlensError("empty fact selection: nothing to probe")
    config = held_out_templates(model, config, facts)  # an injected model: only the templates it was not taught
    template_indices(facts, config)
    store_dir = Path(store_dir)
    device = device or probe_device()
    _open_store(store_dir, store_meta(model, model_fingerprint(model), config, device))
    launched = shard is None
    rank, world = process_shard() if launched else shard
    done = load_probe(store_dir)
    ordered = sorted({f.id: f for f in facts}.values(), key=lambda f: f.id)
    mine = [f for i, f in enumerate(ordered) if i % world == rank and f.id not in done]
    if mine and done and config.stop_at_newline and "newline_rule" not in read_store_meta(store_dir):
        raise SftlensError(f"{store_dir}: written when a leading newline ended a sample; its {len(done)} records "
                           "cannot be continued under the current rule: probe into another --store")
    if mine:
        lm, tokenizer = load_model(model, dtype=config.dtype, device=device)
        records_file = store_dir / f"records-rank{rank}.jsonl"
        with exclusive_writer(records_file, "probe store"), JsonlAppender(records_file) as log:
            if config.batch_size or lm.device.type != "cuda":
                probe_facts(lm, tokenizer, mine, config, on_record=lambda r: log.write(r.to_row()), progress=progress)
            else:
                _probe_fitting_gpu(lm, tokenizer, mine, config, log, store_dir, progress)
    if launched and world > 1:
        _state().wait_for_everyone()
    records = load_probe(store_dir)
    return {f.id: records[f.id] for f in ordered if f.id in records}


def _probe_fitting_gpu(lm, tokenizer, facts, config, log, store_dir, progress) -> None:
    """On CUDA, start large and let accelerate shrink the batch after an out-of-memory error;
    a retry skips the facts already written, so no work is repeated beyond the failed chunk."""
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=max(1, CUDA_START_PROMPTS // config.samples))
    def attempt(batch_size: int) -> None:
        done = load_probe(store_dir)
        todo = [f for f in facts if f.id not in done]
        probe_facts(lm, tokenizer, todo, config, batch_size=batch_size,
                    on_record=lambda r: log.write(r.to_row()), progress=progress)

    attempt()


def default_store(model: str, config: ProbeConfig) -> Path:
    meta = store_meta(model, model_fingerprint(model), config, probe_device())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or model).strip("-")
    return Path("sftlens-probes") / f"{slug}-{meta['key'][:12]}"
