"""Bad input, found before anything is written: each a one-line `SftlensError` naming what differs.

Both models must be local safetensors folders of one architecture with the same tensors (names,
shapes, dtypes) and the same tokenizer (vocabulary and special tokens); a fine-tune whose weights
equal its base's is no fine-tune. Hub ids are taken from the local hub cache (or downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftlens.errors import SftlensError
from sftlens.models import load_tokenizer, resolve_model
from sftlens.weights.checkpoints import CheckpointPair, open_pair


def local_folder(spec: str, role: str) -> str:
    """A built-in name, folder or hub id as a local model folder (hub ids: the hub cache's snapshot)."""
    location = resolve_model(spec)
    if Path(location).is_dir():
        return location
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # the hub client raises many kinds (offline, missing repo, auth)
        raise SftlensError(f"--{role} {spec}: no such model folder, and not fetchable from the hub "
                           f"({type(err).__name__})") from None


def _config(folder: str) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SftlensError(f"{folder}/config.json: unreadable ({err})") from None


def check_architecture(base: str, finetuned: str) -> None:
    b, f = _config(base), _config(finetuned)
    for key in ("model_type", "architectures"):
        if b.get(key) != f.get(key):
            raise SftlensError(f"different architectures: {key} {b.get(key)} in {base} but {f.get(key)} in {finetuned}")


def check_tokenizers(base: str, finetuned: str) -> None:
    b, f = load_tokenizer(base), load_tokenizer(finetuned)
    vb, vf = b.get_vocab(), f.get_vocab()
    if vb != vf:
        differ = sorted(set(vb.items()) ^ set(vf.items()))
        raise SftlensError(f"different tokenizers: vocabularies of {len(vb)} and {len(vf)} tokens "
                           f"({len(differ)} entries differ, e.g. {differ[0][0]!r})")
    for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        if getattr(b, name) != getattr(f, name):
            raise SftlensError(f"different tokenizers: {name} {getattr(b, name)} in {base} but "
                               f"{getattr(f, name)} in {finetuned}")


def check_moved(pair: CheckpointPair) -> None:
    """Stops at the first element that differs: a real fine-tune costs a block, a copy one pass."""
    for name in sorted(pair.base.shapes):
        for chunk in pair.chunks(name):
            if not torch.equal(chunk.base, chunk.finetuned):
                return
    raise SftlensError(f"the fine-tune {pair.finetuned.root} is identical to its base {pair.base.root}: "
                       "every weight is equal, there is nothing to audit")


def check_pair(base: str, finetuned: str) -> tuple[str, str]:
    """Local folders of the two models, after every check above (architecture and tokenizer first:
    they name the cause when tensor shapes differ because of them)."""
    base_dir, ft_dir = local_folder(base, "base"), local_folder(finetuned, "finetuned")
    check_architecture(base_dir, ft_dir)
    check_tokenizers(base_dir, ft_dir)
    pair = open_pair(base_dir, ft_dir)  # tensor names, shapes and dtypes
    check_moved(pair)
    return base_dir, ft_dir
