"""Update statistics (paper Section 5, Table 3) and the exact streamed selection behind restoration.

Two checkpoints are streamed tensor by tensor with safetensors `safe_open`, over all shards, and
every per-element change is computed in fp32: absolute |new - old| or relative
|new - old| / (|old| + 1e-8) (the paper's published code ranks by the relative one).

Selection without a flat copy of the model
------------------------------------------
Each element gets an int32 *key* whose order is the selection order: for "top" the bit pattern
of its fp32 change (non-negative floats order like their int32 bit patterns), for "bottom" its
complement, for "random" a seeded hash of (seed, tensor name, flat index), so the draw does not
depend on sharding, on chunking or on which other tensors exist. Selecting k elements = taking the k
largest keys. Ties are broken deterministically: tensors in sorted-name order, then flat index
(row-major) inside a tensor; so exactly floor(n * k / 100) elements are selected and the selection
for a smaller ratio is always contained in the one for a larger ratio.

With scope "global" the exact k-th key is found for every ratio of a sweep at once:
  pass 1  histogram of the high 20 bits of every key (2**20 bins), over all tensors;
  pass 2  for each ratio's boundary bin, histogram of the low 11 bits of the keys in that bin,
          kept per tensor (7 x 2048 counts); summed, they give the exact threshold key T and
          how many keys exceed it; per tensor, how many keys equal T, so the ties can be handed
          out in tensor order without another pass.
With scope "tensor" each tensor's own floor(numel * k / 100) elements are found the same way,
inside the tensor. The cost is a constant number of passes for the whole sweep.

Every pass reads a tensor in chunks of whole rows (at most `CHUNK_ELEMENTS` elements, one
`safe_open` mapping per chunk), and ties are handed out across chunks in flat order, so peak memory
is a few copies of one chunk, whatever the size of the model or of its largest tensor.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Literal

import torch

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, atomic_write_text, stable_hash
from sftlens.models import resolve_model
from sftlens.markdown import markdown_table
from sftlens.report import figure_panels, save_figure

DEFAULT_RATIOS = (1.0, 3.0, 5.0, 10.0, 20.0, 40.0, 60.0)
RELATIVE_EPS = 1e-8
_HIGH_SHIFT = 11
_N_HIGH = 1 << 20  # keys are non-negative int32: 20 high bits, 11 low bits
_N_LOW = 1 << _HIGH_SHIFT
_MAX_KEY = 0x7FFFFFFF
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


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class SelectionConfig:
    """Which elements count as 'the k % most changed' (shared by deltas and restore)."""

    metric: Literal["relative", "absolute", "relative_nonzero"] = field(
        default="relative",
        metadata={"help": "rank by |new-old|/(|old|+1e-8), by |new-old|, or relative with elements whose "
                          "base value is exactly 0 counted as unchanged (relative_nonzero)"})
    scope: Literal["global", "tensor"] = field(
        default="global", metadata={"help": "k %% of all region elements, or k %% of each tensor"})
    region: str = field(
        default="body",
        metadata={"help": "body (layers without norms), attention, mlp, embeddings (incl. lm_head), "
                          "all, or a regex over tensor names"})
    strategy: Literal["top", "bottom", "random"] = field(
        default="top", metadata={"help": "take the largest changes, the smallest, or a seeded random set"})
    seed: int = field(default=0, metadata={"help": "seed of the random strategy"})

    def __post_init__(self):
        if self.region not in REGIONS:
            try:
                re.compile(self.region)
            except re.error as err:
                raise ValueError(f"region {self.region!r} is neither one of {', '.join(REGIONS)} "
                                 f"nor a valid regex ({err})") from None


@dataclass(frozen=True)
class DeltasConfig(SelectionConfig):
    """Settings of `sftlens deltas`: which change is measured over which tensors."""


def parse_ratios(ratios) -> tuple[float, ...]:
    """Sorted, de-duplicated percentages, each in (0, 100]."""
    values = []
    for r in ratios:
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise SftlensError(f"ratio {r!r} is not a number") from None
        if not (0 < value <= 100) or math.isnan(value):
            raise SftlensError(f"ratio {r!r} is outside (0, 100]")
        values.append(value)
    if not values:
        raise SftlensError("no ratios given")
    return tuple(sorted(set(values)))


def target_count(n: int, ratio: float) -> int:
    """floor(n * ratio / 100) in exact decimal arithmetic (3.0 % of 100 is 3, not 2.9999)."""
    return math.floor(n * Fraction(repr(float(ratio))) / 100)


# --- checkpoints ----------------------------------------------------------------------------

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

    def names_in(self, shard: str) -> list[str]:
        return sorted(n for n, s in self.shard_of.items() if s == shard)

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


# --- per-element change and keys -------------------------------------------------------------

def change(base: torch.Tensor, finetuned: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-element change in fp32 (a fresh tensor; the inputs are not modified)."""
    delta = finetuned.float().sub(base.float()).abs_()  # float() of an fp32 input is the input itself
    if metric != "absolute":
        base_abs = base.float().abs()
        delta.div_(base_abs + RELATIVE_EPS)
        if metric == "relative_nonzero":
            # |d| / 1e-8 on an exactly-zero base (left by de-quantisation) would outweigh everything else
            delta.masked_fill_(base_abs == 0, 0.0)
    return delta.contiguous()


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**31) that scatters neighbouring integers (int64 arithmetic, no
    overflow: every product stays below 2**58)."""
    for _ in range(3):
        x = (x ^ (x >> 16)).mul_(0x45D9F3B).bitwise_and_(_MAX_KEY)
    return x ^ (x >> 16)


def random_keys(name: str, seed: int, offset: int, shape) -> torch.Tensor:
    """Seeded pseudo-random int32 keys of the elements offset, offset + 1, ... of tensor `name`.
    A key is a function of (seed, name, flat index) alone, so it does not depend on how a tensor
    is read in chunks; within a tensor of < 2**31 elements no two keys are equal."""
    salt = int(stable_hash([seed, name]), 16)
    index = torch.arange(offset, offset + math.prod(shape), dtype=torch.int64)
    keys = _mix31((index & _MAX_KEY) ^ (salt & _MAX_KEY))
    keys = _mix31(keys ^ (index >> 31) ^ ((salt >> 31) & _MAX_KEY))
    return keys.to(torch.int32).view(shape)


def selection_keys(delta: torch.Tensor, name: str, strategy: str, seed: int, offset: int = 0) -> torch.Tensor:
    """int32 keys, larger = selected first (see the module docstring); `offset` is the flat index
    of `delta`'s first element in its tensor."""
    if strategy == "top":
        return delta.view(torch.int32)
    if strategy == "bottom":
        return _MAX_KEY - delta.view(torch.int32)
    return random_keys(name, seed, offset, delta.shape)


def chunk_keys(pair: CheckpointPair, name: str, chunk: Chunk, config: SelectionConfig,
               check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(change, keys) of one chunk of a tensor."""
    delta = change(chunk.base, chunk.finetuned, config.metric)
    if check_finite:
        # a NaN/Inf in either input makes the change non-finite, so its sum screens both
        total = delta.sum()
        assert_finite(pair.base, name, chunk.base, total)
        assert_finite(pair.finetuned, name, chunk.finetuned, total)
    return delta, selection_keys(delta, name, config.strategy, config.seed, chunk.offset)


def tensor_keys(pair: CheckpointPair, name: str, config: SelectionConfig,
                check_finite: bool = False) -> Iterator[tuple[Chunk, torch.Tensor, torch.Tensor]]:
    """(chunk, change, keys) of every chunk of one tensor, in flat order."""
    for chunk in pair.chunks(name):
        yield chunk, *chunk_keys(pair, name, chunk, config, check_finite)


# --- exact thresholds --------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    """Select the keys > threshold, plus the first `ties` keys == threshold in flat order
    (all of them when `ties` is None)."""

    threshold: int
    ties: int | None = None


class TensorCuts:
    """Applies one tensor's cuts (one per ratio) to its keys, chunk after chunk in flat order: the
    tied keys a cut takes are the first ones of the tensor, however it is chunked."""

    def __init__(self, cuts: list[Cut | None]):
        self.cuts = cuts
        self.ties_left = [cut.ties if cut is not None else 0 for cut in cuts]

    def masks(self, keys: torch.Tensor) -> list[torch.Tensor]:
        return [self.mask(i, keys) for i in range(len(self.cuts))]

    def mask(self, i: int, keys: torch.Tensor) -> torch.Tensor:
        """Ratio i's mask of the next chunk of keys."""
        cut = self.cuts[i]
        if cut is None:
            return torch.zeros(keys.shape, dtype=torch.bool)
        if cut.ties is None:
            return keys >= cut.threshold
        mask = keys > cut.threshold
        if self.ties_left[i]:
            tied = (keys == cut.threshold).view(-1).nonzero().squeeze(1)[: self.ties_left[i]]
            mask.view(-1)[tied] = True
            self.ties_left[i] -= len(tied)
        return mask


def _locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin i holding the k-th largest element (1-based), and how many elements lie above it."""
    tail = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(tail, torch.tensor([k], dtype=tail.dtype)))
    i = len(counts) - 1 - j
    return i, int(tail[j]) - int(counts[i])


def _high_histogram(keys: torch.Tensor) -> torch.Tensor:
    return torch.bincount((keys >> _HIGH_SHIFT).view(-1), minlength=_N_HIGH)


def _bin_slots(bins: list[int]) -> torch.Tensor:
    """High part -> row of the boundary histogram; every other bin goes to one extra row."""
    slot = torch.full((_N_HIGH,), len(bins), dtype=torch.int32)
    slot[torch.tensor(bins, dtype=torch.long)] = torch.arange(len(bins), dtype=torch.int32)
    return slot


def _low_histograms(keys: torch.Tensor, slot: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(n_bins, _N_LOW) int32 histograms of the low bits of the keys in the boundary bins."""
    # one extra, discarded row for the other keys is cheaper than masking them out
    flat = keys.view(-1)
    combined = slot[flat >> _HIGH_SHIFT].mul_(_N_LOW).add_(flat & (_N_LOW - 1))
    counts = torch.bincount(combined, minlength=(n_bins + 1) * _N_LOW)
    return counts[: n_bins * _N_LOW].view(n_bins, _N_LOW).int()


@dataclass(frozen=True)
class _Boundary:
    threshold: int  # the k-th largest key
    greater: int  # keys strictly above it
    equal: int  # keys equal to it
    row: int  # which boundary histogram holds it
    low: int  # its low bits

    def cut(self, k: int) -> Cut:
        take = k - self.greater
        return Cut(self.threshold, None if take == self.equal else take)


def _boundaries(high: torch.Tensor, ks: list[int], lows_of) -> tuple[list[_Boundary | None], object]:
    """Each k's boundary (None for k = 0), from the high histogram and the boundary bins' low
    histograms, which `lows_of(bins)` computes and returns as (summed histograms, anything)."""
    coarse = {k: _locate(high, k) for k in ks if k > 0}
    bins = sorted({b for b, _ in coarse.values()})
    lows, extra = lows_of(bins) if bins else (None, None)
    found: list[_Boundary | None] = []
    for k in ks:
        if k == 0:
            found.append(None)
            continue
        bin_, above = coarse[k]
        row = bins.index(bin_)
        low, above_low = _locate(lows[row].long(), k - above)
        found.append(_Boundary((bin_ << _HIGH_SHIFT) | low, above + above_low, int(lows[row, low]), row, low))
    return found, extra


def tensor_cuts(pair: CheckpointPair, name: str, config: SelectionConfig,
                ratios: tuple[float, ...]) -> tuple[list[Cut | None], int]:
    """Per-tensor scope: each ratio's floor(numel * k / 100) largest keys of this tensor, and how
    many passes over it that took (a tensor read in one chunk is read once, its keys kept)."""
    single = len(row_blocks(pair.base.shapes[name])) == 1
    kept = [keys for _, _, keys in tensor_keys(pair, name, config, check_finite=True)] if single else None

    def key_chunks(check_finite: bool = False):
        return iter(kept) if kept else (keys for _, _, keys in tensor_keys(pair, name, config, check_finite))

    high = sum(_high_histogram(keys) for keys in key_chunks(check_finite=True))

    def lows_of(bins: list[int]):
        slot = _bin_slots(bins)
        return sum(_low_histograms(keys, slot, len(bins)) for keys in key_chunks()), None

    ks = [target_count(pair.numel(name), r) for r in ratios]
    found, _ = _boundaries(high, ks, lows_of)
    return [None if b is None else b.cut(k) for k, b in zip(ks, found)], 1 if single else 2


@dataclass
class Selection:
    """Where each ratio's cut lies, per tensor: enough to rebuild the selected set of any tensor."""

    config: SelectionConfig
    ratios: tuple[float, ...]
    names: list[str]  # region tensors, in tie-break order
    numel: dict[str, int]
    cuts: dict[str, list[Cut | None]]  # name -> one cut per ratio
    passes: int

    @property
    def total(self) -> int:
        return sum(self.numel.values())

    def selected_count(self, ratio_index: int) -> int:
        """Exactly floor(n * k / 100) for scope global; the sum of the per-tensor counts otherwise."""
        if self.config.scope == "global":
            return target_count(self.total, self.ratios[ratio_index])
        return sum(target_count(self.numel[n], self.ratios[ratio_index]) for n in self.names)

    def cutter(self, name: str) -> TensorCuts:
        """Feed it tensor `name`'s key chunks in flat order; it gives each ratio's mask."""
        return TensorCuts(self.cuts[name])


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=not enabled, leave=False)


def select(pair: CheckpointPair, ratios, config: SelectionConfig, progress: bool = True) -> Selection:
    """The exact selection of every ratio of a sweep, found in a constant number of passes."""
    ratios = parse_ratios(ratios)
    names = pair.region_names(config.region)
    numel = {n: pair.numel(n) for n in names}
    if config.scope == "tensor":
        cuts, passes = {}, 1
        for name in _progress(names, "thresholds per tensor", progress):
            cuts[name], tensor_passes = tensor_cuts(pair, name, config, ratios)
            passes = max(passes, tensor_passes)
        return Selection(config, ratios, names, numel, cuts, passes=passes)

    high = torch.zeros(_N_HIGH, dtype=torch.long)
    for name in _progress(names, "pass 1: key histogram", progress):
        for _, _, keys in tensor_keys(pair, name, config, check_finite=True):
            high += _high_histogram(keys)

    def boundary_histograms(bins: list[int]):
        # Each tensor's own boundary histograms are kept (a few KB per tensor), so the keys equal
        # to a threshold can be counted per tensor, and ties handed out, without another pass.
        # One block allocated up front: small per-tensor results allocated between the passes'
        # large temporaries would pin the heap and keep hundreds of MB of freed memory resident.
        slot = _bin_slots(bins)
        counts = torch.zeros(len(names), len(bins), _N_LOW, dtype=torch.int32)
        for row, name in enumerate(_progress(names, "pass 2: boundary refinement", progress)):
            for _, _, keys in tensor_keys(pair, name, config):
                counts[row] += _low_histograms(keys, slot, len(bins))
        return counts.sum(0, dtype=torch.long), dict(zip(names, counts))

    ks = [target_count(sum(numel.values()), r) for r in ratios]
    found, per_tensor = _boundaries(high, ks, boundary_histograms)
    cuts: dict[str, list[Cut | None]] = {name: [] for name in names}
    for k, boundary in zip(ks, found):
        remaining = k - boundary.greater if boundary else 0
        for name in names:  # sorted: the tie-break order
            if boundary is None:
                cuts[name].append(None)
                continue
            equal = int(per_tensor[name][boundary.row, boundary.low])
            take = min(remaining, equal)
            remaining -= take
            cuts[name].append(Cut(boundary.threshold, None if take == equal else take))
    return Selection(config, ratios, names, numel, cuts, passes=2 if any(ks) else 1)


# --- concentration (Table 3) ---------------------------------------------------------------

def concentration(base_dir, ft_dir, config: DeltasConfig = DeltasConfig(), ratios=DEFAULT_RATIOS,
                  progress: bool = True) -> dict:
    """Share of the total change held by the selected k % of elements, for every ratio, plus
    per-tensor summaries. Sums are accumulated in float64."""
    start = time.perf_counter()
    pair = open_pair(base_dir, ft_dir)
    selection = select(pair, ratios, config, progress)
    ratios = selection.ratios
    total = 0.0
    held = [0.0] * len(ratios)
    tensors = []
    for name in _progress(selection.names, "summaries", progress):
        cutter = selection.cutter(name)
        tensor_total, tensor_max, counts = 0.0, 0.0, [0] * len(ratios)
        for _, delta, keys in tensor_keys(pair, name, config):
            tensor_total += float(delta.sum(dtype=torch.float64))
            tensor_max = max(tensor_max, float(delta.max()) if delta.numel() else 0.0)
            for i, mask in enumerate(cutter.masks(keys)):
                counts[i] += int(torch.count_nonzero(mask))
                held[i] += float(delta[mask].sum(dtype=torch.float64))
        total += tensor_total
        tensors.append({
            "name": name, "layer": layer_index(name), "numel": selection.numel[name],
            "sum": tensor_total, "mean": tensor_total / max(selection.numel[name], 1),
            "max": tensor_max, "selected": counts,
        })
    selected = [selection.selected_count(i) for i in range(len(ratios))]
    for row in tensors:
        row["share_of_total"] = row["sum"] / total if total else 0.0
        row["share_of_selected"] = [c / s if s else 0.0 for c, s in zip(row.pop("selected"), selected)]
    return {
        "base": str(pair.base.root), "finetuned": str(pair.finetuned.root),
        "config": config_to_dict(config), "ratios": list(ratios), "elements": selection.total,
        "total_change": total, "selected": selected,
        "shares": [h / total if total else 0.0 for h in held],
        "tensors": tensors, "passes": selection.passes + 1,
        "seconds": round(time.perf_counter() - start, 3),
    }


def zero_base_mass(base_dir, ft_dir, region: str = "body") -> dict:
    """How much of the relative change sits on elements whose base value is exactly 0: there
    |d| / (0 + 1e-8) is huge, so a few such elements (e.g. left by Q4_1 de-quantisation, which
    rounds small weights to 0) can dominate every relative-change statistic."""
    pair = open_pair(base_dir, ft_dir)
    elements = zeros = 0
    total = on_zeros = 0.0
    for name in pair.region_names(region):
        for chunk in pair.chunks(name):
            relative = change(chunk.base, chunk.finetuned, "relative")
            zero = chunk.base == 0
            elements += relative.numel()
            zeros += int(torch.count_nonzero(zero))
            total += float(relative.sum(dtype=torch.float64))
            on_zeros += float(relative[zero].sum(dtype=torch.float64))
    return {"region": region, "elements": elements, "zero_base_elements": zeros,
            "zero_base_share_of_elements": zeros / elements if elements else 0.0,
            "zero_base_share_of_relative_change": on_zeros / total if total else 0.0}


def concentration_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Share of the total {cfg['metric']} change held by the {cfg['strategy']} k % of "
        f"{result['elements']:,} elements (region {cfg['region']}, scope {cfg['scope']})",
        "",
        markdown_table(["k (%)", "elements", "share of total change (%)"],
                       [[f"{r:g}", f"{n:,}", f"{100 * s:.2f}"]
                        for r, n, s in zip(result["ratios"], result["selected"], result["shares"])], "rrr"),
    ]
    return "\n".join(lines)


def concentration_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ratio", "elements", "share"])
    for r, n, s in zip(result["ratios"], result["selected"], result["shares"]):
        writer.writerow([f"{r:g}", n, f"{s:.8f}"])
    return out.getvalue()


def tensors_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "layer", "numel", "mean", "max", "share_of_total",
                     *[f"share_of_top_{r:g}" for r in result["ratios"]]])
    for t in result["tensors"]:
        writer.writerow([t["name"], "" if t["layer"] is None else t["layer"], t["numel"], f"{t['mean']:.6g}",
                         f"{t['max']:.6g}", f"{t['share_of_total']:.6g}",
                         *[f"{s:.6g}" for s in t["share_of_selected"]]])
    return out.getvalue()


def plot_concentration(result: dict, path: str | Path) -> Path:
    """Cumulative share curve, and the share of the top-k elements each layer holds."""
    figure, (curve, layers) = figure_panels(2, width=5.5)
    xs = [0.0, *result["ratios"]]
    ys = [0.0, *(100 * s for s in result["shares"])]
    curve.plot(xs, ys, marker="o")
    curve.plot([0, 100], [0, 100], linestyle=":", color="grey", label="uniform")
    curve.set_xlabel("top k % of elements")
    curve.set_ylabel("% of total change")
    curve.set_title(f"{result['config']['metric']} change, region {result['config']['region']}")
    curve.legend()
    by_layer: dict[int, list[float]] = {}
    for t in result["tensors"]:
        if t["layer"] is not None:
            acc = by_layer.setdefault(t["layer"], [0.0] * len(result["ratios"]))
            for i, s in enumerate(t["share_of_selected"]):
                acc[i] += s
    order = sorted(by_layer)
    for i, r in enumerate(result["ratios"]):
        layers.plot(order, [100 * by_layer[layer][i] for layer in order], marker=".", label=f"top {r:g} %")
    layers.set_xlabel("layer")
    layers.set_ylabel("% of the selected elements")
    layers.set_title("where the selected elements lie")
    if order:
        layers.legend(fontsize="small")
    return save_figure(figure, path)


def write_concentration(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    files = {"json": out / "concentration.json", "markdown": out / "concentration.md",
             "csv": out / "concentration.csv", "tensors": out / "tensors.csv", "figure": out / "concentration.png"}
    atomic_write_json(files["json"], result)
    atomic_write_text(files["markdown"], concentration_markdown(result) + "\n")
    atomic_write_text(files["csv"], concentration_csv(result))
    atomic_write_text(files["tensors"], tensors_csv(result))
    plot_concentration(result, files["figure"])
    return files


def zero_base_note(zero: dict) -> str:
    """One paragraph on the zero-base artefact, with a warning when it dominates the relative change."""
    text = (f"Elements whose base value is exactly 0: {zero['zero_base_elements']:,} of {zero['elements']:,} "
            f"({100 * zero['zero_base_share_of_elements']:.4f} %); they hold "
            f"{100 * zero['zero_base_share_of_relative_change']:.2f} % of the relative change.")
    if zero["zero_base_share_of_relative_change"] > 0.5:
        text += (" The relative metric is dominated by them (|d| / 1e-8): read --metric absolute or "
                 "--metric relative_nonzero.")
    return text


def _run_deltas(args: argparse.Namespace) -> None:
    config = config_from_args(DeltasConfig, args)
    result = concentration(args.base, args.finetuned, config, parse_ratios(args.ratios))
    result["zero_base"] = zero_base_mass(args.base, args.finetuned, config.region)
    files = write_concentration(result, args.out)
    print(concentration_markdown(result))
    print("\n" + zero_base_note(result["zero_base"]))
    print(f"\n{result['passes']} passes over {len(result['tensors'])} tensors in {result['seconds']:.1f}s; "
          f"wrote {', '.join(str(p) for p in files.values())}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("deltas", help="how concentrated the fine-tuning update is (Table 3)")
    parser.add_argument("--base", required=True, help="base model (built-in name or folder)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (built-in name or folder)")
    parser.add_argument("--out", required=True, help="output folder for tables and figure")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                        type=lambda s: tuple(x for x in s.split(",") if x.strip()),
                        help="comma list of percentages (default: 1,3,5,10,20,40,60)")
    add_config_arguments(parser, DeltasConfig)
    parser.set_defaults(func=_run_deltas, writes="out")


__all__ = [
    "CHUNK_ELEMENTS", "DEFAULT_RATIOS", "REGIONS", "Checkpoint", "CheckpointPair", "Chunk", "Cut",
    "DeltasConfig", "Selection", "SelectionConfig", "TensorCuts", "change", "chunk_keys", "concentration",
    "concentration_csv", "concentration_markdown", "in_region", "open_checkpoint", "open_pair",
    "parse_ratios", "plot_concentration", "random_keys", "row_blocks", "select", "selection_keys",
    "target_count", "tensor_cuts", "tensor_keys", "tensors_csv", "write_concentration",
]
