"""Streaming a pair of safetensors checkpoints (base, fine-tuned) in blocks of whole rows.

A tensor is read in blocks of at most `CHUNK_ELEMENTS` elements (at least one row), each through
its own `safe_open` mapping, so resident memory never holds more than a few blocks, whatever the
size of the model, of its shards or of its largest tensor. Regions name the tensors an edit or a
statistic covers (layers without norms by default).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sftlens.errors import SftlensError
from sftlens.models import resolve_model

# 4 Mi elements: a 16 MB fp32 change per chunk, small enough that the few temporaries of a chunk
# stay far below the weights' size, large enough that per-chunk overhead is negligible
CHUNK_ELEMENTS = 1 << 22

# Name patterns cover Llama/Qwen/Mistral (model.layers.N.self_attn.q_proj, mlp.gate_proj,
# input_layernorm, embed_tokens, lm_head) and GPT-2 (transformer.h.N.attn.c_attn, mlp.c_fc, ln_1,
# wte, wpe), plus GPT-NeoX/BLOOM/Falcon spellings.
_LAYER = re.compile(r"(^|\.)(layers|h|blocks|layer)\.\d+\.")
_NORM = re.compile(r"(norm|(^|\.)ln_?(\d+|f)?\.)", re.IGNORECASE)
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)\.")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in|embed_out|lm_head)\.")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

REGIONS = ("body", "attention", "mlp", "embeddings", "all")


def in_region(name: str, region: str) -> bool:
    """Whether tensor `name` belongs to `region`: a named region or, failing that, a regex."""
    layer = bool(_LAYER.search(name)) and not _NORM.search(name)
    if region == "body":
        return layer
    if region == "attention":
        return layer and bool(_ATTENTION.search(name))
    if region == "mlp":
        return layer and bool(_MLP.search(name))
    if region == "embeddings":
        return bool(_EMBEDDING.search(name))
    if region == "all":
        return True
    return re.search(region, name) is not None


def check_region(region: str) -> None:
    """ValueError unless `region` is a named region or a valid regex."""
    if region not in REGIONS:
        try:
            re.compile(region)
        except re.error as err:
            raise ValueError(f"region {region!r} is neither one of {', '.join(REGIONS)} "
                             f"nor a valid regex ({err})") from None


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


_INDEX = "model.safetensors.index.json"


def row_blocks(shape: tuple[int, ...]) -> list[tuple[tuple[int, int] | None, int]]:
    """(rows [start, stop) of dimension 0, flat index of the block's first element) of the blocks
    covering a tensor in chunks of at most `CHUNK_ELEMENTS` elements (at least one row each);
    rows is None for a 0-d tensor, read whole."""
    if not shape:
        return [(None, 0)]
    row = math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    return [((start, min(start + step, shape[0])), start * row) for start in range(0, shape[0], step)] \
        or [((0, 0), 0)]


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder, read a tensor or a block of its rows at a time; each read
    maps and unmaps its shard, so resident memory never accumulates more than the block read."""

    root: Path
    shard_of: dict[str, str]  # tensor name -> shard file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.shard_of.values()))

    def read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (the whole tensor for None)."""
        from safetensors import safe_open

        with safe_open(self.root / self.shard_of[name], framework="pt") as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]

    def blocks(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat index of the first element, block) of every block of rows of `name`."""
        for rows, offset in row_blocks(self.shapes[name]):
            yield offset, self.read(name, rows)


@dataclass(frozen=True)
class Chunk:
    """A block of whole rows of one tensor in both checkpoints."""

    rows: tuple[int, int] | None  # None: the whole (0-d) tensor
    offset: int  # flat index of the block's first element
    base: torch.Tensor
    finetuned: torch.Tensor


def open_checkpoint(spec: str | Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    root = Path(resolve_model(str(spec)))
    if not root.is_dir():
        raise SftlensError(f"{spec}: a checkpoint must be a local folder with safetensors weights")
    index = root / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SftlensError(f"{index}: not a safetensors index (no weight_map)") from None
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
        if not shards:
            raise SftlensError(f"{root}: no safetensors weights (model.safetensors or {_INDEX})")
        weight_map = None
    shard_of: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for shard in shards:
        path = root / shard
        if not path.is_file():
            raise SftlensError(f"{path}: shard listed in {index.name} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    shard_of[name] = shard
                    shapes[name] = tuple(piece.get_shape())
                    dtypes[name] = piece.get_dtype()
        except (SafetensorError, OSError) as err:
            raise SftlensError(f"{path}: unreadable safetensors file ({err})") from None
    if weight_map is not None:
        for name, shard in weight_map.items():
            if shard_of.get(name) != shard:
                raise SftlensError(f"{index}: tensor {name} is not in {shard}")
    return Checkpoint(root, shard_of, shapes, dtypes)


@dataclass
class CheckpointPair:
    """Base and fine-tuned checkpoints with identical tensor names, shapes and dtypes."""

    base: Checkpoint
    finetuned: Checkpoint

    def __post_init__(self):
        b, f = self.base, self.finetuned
        only_base = sorted(set(b.shapes) - set(f.shapes))
        only_ft = sorted(set(f.shapes) - set(b.shapes))
        if only_base or only_ft:
            which, root, name = ("base", f.root, only_base[0]) if only_base else ("fine-tuned", b.root, only_ft[0])
            raise SftlensError(f"tensor {name} of the {which} checkpoint is missing from {root} "
                               f"({len(only_base) + len(only_ft)} names differ)")
        for name in sorted(b.shapes):
            if b.shapes[name] != f.shapes[name]:
                raise SftlensError(f"tensor {name}: shape {list(b.shapes[name])} in {b.root} "
                                   f"but {list(f.shapes[name])} in {f.root}")
            if b.dtypes[name] != f.dtypes[name]:
                raise SftlensError(f"tensor {name}: dtype {b.dtypes[name]} in {b.root} "
                                   f"but {f.dtypes[name]} in {f.root}")

    def region_names(self, region: str) -> list[str]:
        """Sorted floating-point tensors of `region`: the tie-break order of the selection."""
        floats = ("F64", "F32", "F16", "BF16")
        names = [n for n in sorted(self.base.shapes) if self.base.dtypes[n] in floats and in_region(n, region)]
        if not names:
            raise SftlensError(f"region {region!r} matches no floating-point tensor of {self.base.root}")
        return names

    def numel(self, name: str) -> int:
        return math.prod(self.base.shapes[name])

    def chunks(self, name: str) -> Iterator[Chunk]:
        for rows, offset in row_blocks(self.base.shapes[name]):
            yield Chunk(rows, offset, self.base.read(name, rows), self.finetuned.read(name, rows))


def assert_finite(ckpt: Checkpoint, name: str, tensor: torch.Tensor, summary: torch.Tensor | None = None) -> None:
    """Raise on a NaN/Inf in `tensor`. A NaN or Inf anywhere makes a sum non-finite, so the one
    fast reduction `summary` (default: the tensor's own sum) decides; only a non-finite (or
    overflowed) sum pays for the exact element-wise test."""
    if not tensor.is_floating_point():
        return
    total = tensor.float().sum() if summary is None else summary
    if not math.isfinite(float(total)) and not bool(torch.isfinite(tensor).all()):
        raise SftlensError(f"{ckpt.root / ckpt.shard_of[name]}: tensor {name} contains NaN or Inf")


def open_pair(base: str | Path, finetuned: str | Path) -> CheckpointPair:
    return CheckpointPair(open_checkpoint(base), open_checkpoint(finetuned))


def tensors_by_checkpoint_name(model, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its checkpoint files use as well as its own: transformers
    renames some on loading (GPT-NeoX's `embed_out` is `lm_head` in memory). Only renamed entries that
    are the model's own tensor objects count: a tensor its conversion rebuilt (fused experts) would take
    a write without editing the model (or hold no gradient), so it stays missing and the caller refuses it.
    `keep_vars`: the parameters themselves (their `.grad`), not detached views."""
    state = model.state_dict(keep_vars=keep_vars)
    from transformers.core_model_loading import revert_weight_conversion

    own = {id(tensor) for tensor in state.values()}
    saved = revert_weight_conversion(model, dict(state))
    return {**state, **{name: tensor for name, tensor in saved.items() if id(tensor) in own}}


def progress_bar(items, desc: str, enabled: bool):
    """A tensor-by-tensor progress bar over `items` (a pass over a checkpoint)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=not enabled, leave=False)
