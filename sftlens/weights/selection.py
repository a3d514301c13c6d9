"""Exact streamed selection: which elements of a checkpoint pair are "the k % most changed".

Every per-element change is computed in fp32: absolute |new - old| or relative
|new - old| / (|old| + 1e-8) (the paper's published code ranks by the relative one). A caller may
rank by a quantity of its own instead (`Score`: a function of the tensor name and the chunk, e.g.
the guided repair's |new - old| weighted by stored fact importances, `sftlens.weights.guided`);
it is computed chunk by chunk like the change, so the selection stays exact and streamed.

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

Every pass reads a tensor in chunks of whole rows (at most `CHUNK_ELEMENTS` elements, see
`sftlens.weights.checkpoints`), and ties are handed out across chunks in flat order, so peak
memory is a few copies of one chunk, whatever the size of the model or of its largest tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch

from sftlens.errors import SftlensError
from sftlens.io import stable_hash
from sftlens.weights.checkpoints import CheckpointPair, Chunk, assert_finite, check_region, progress_bar, row_blocks

DEFAULT_RATIOS = (1.0, 3.0, 5.0, 10.0, 20.0, 40.0, 60.0)
RELATIVE_EPS = 1e-8
_HIGH_SHIFT = 11
_N_HIGH = 1 << 20  # keys are non-negative int32: 20 high bits, 11 low bits
_N_LOW = 1 << _HIGH_SHIFT
_MAX_KEY = 0x7FFFFFFF

# A per-element quantity of a chunk to rank by in place of the config's metric: (tensor name, chunk) ->
# a fresh contiguous fp32 tensor of the chunk's shape, every element >= +0 (NaN-free), so its int32 bit
# patterns order like its values.
Score = Callable[[str, Chunk], torch.Tensor]


@dataclass(frozen=True)
class SelectionConfig:
    """Which elements count as 'the k % most changed' (shared by deltas, restore and trim)."""

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
        check_region(self.region)


def parse_numbers(values, name: str, admits, interval: str, plural: str) -> tuple[float, ...]:
    """Sorted, de-duplicated numbers, each admitted by `admits`; one-line errors name the value as
    `name` and its range as `interval` (a knob's sweep: ratios, or a repair method's values)."""
    parsed = []
    for v in values:
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise SftlensError(f"{name} {v!r} is not a number") from None
        if math.isnan(value) or not admits(value):
            raise SftlensError(f"{name} {v!r} is outside {interval}")
        parsed.append(value)
    if not parsed:
        raise SftlensError(f"no {plural} given")
    return tuple(sorted(set(parsed)))


def parse_ratios(ratios) -> tuple[float, ...]:
    """Sorted, de-duplicated percentages, each in (0, 100]."""
    return parse_numbers(ratios, "ratio", lambda value: 0 < value <= 100, "(0, 100]", "ratios")


def target_count(n: int, ratio: float) -> int:
    """floor(n * ratio / 100) in exact decimal arithmetic (3.0 % of 100 is 3, not 2.9999)."""
    return math.floor(n * Fraction(repr(float(ratio))) / 100)

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
    """A bijection of [0, 2**31) that scatters neighbouring integers, applied to `x` in place (int64
    arithmetic, no overflow: every product stays below 2**58). In place with one scratch buffer:
    fresh 8-byte-per-element temporaries would cost more than the arithmetic."""
    shifted = torch.empty_like(x)
    for _ in range(3):
        torch.bitwise_right_shift(x, 16, out=shifted)
        x.bitwise_xor_(shifted).mul_(0x45D9F3B).bitwise_and_(_MAX_KEY)
    torch.bitwise_right_shift(x, 16, out=shifted)
    return x.bitwise_xor_(shifted)


def random_keys(name: str, seed: int, offset: int, shape) -> torch.Tensor:
    """Seeded pseudo-random int32 keys of the elements offset, offset + 1, ... of tensor `name`.
    A key is a function of (seed, name, flat index) alone, so it does not depend on how a tensor
    is read in chunks; within a tensor of < 2**31 elements no two keys are equal."""
    salt = int(stable_hash([seed, name]), 16)
    index = torch.arange(offset, offset + math.prod(shape), dtype=torch.int64)
    keys = _mix31((index & _MAX_KEY).bitwise_xor_(salt & _MAX_KEY))
    keys.bitwise_xor_(index.bitwise_right_shift_(31)).bitwise_xor_((salt >> 31) & _MAX_KEY)
    return _mix31(keys).to(torch.int32).view(shape)


def selection_keys(delta: torch.Tensor, name: str, strategy: str, seed: int, offset: int = 0) -> torch.Tensor:
    """int32 keys, larger = selected first (see the module docstring); `offset` is the flat index
    of `delta`'s first element in its tensor."""
    if strategy == "top":
        return delta.view(torch.int32)
    if strategy == "bottom":
        return _MAX_KEY - delta.view(torch.int32)
    return random_keys(name, seed, offset, delta.shape)


def chunk_keys(pair: CheckpointPair, name: str, chunk: Chunk, config: SelectionConfig,
               check_finite: bool = False, score: Score | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(change, keys) of one chunk of a tensor; the change is `score`'s when one is given."""
    delta = change(chunk.base, chunk.finetuned, config.metric) if score is None else score(name, chunk)
    if check_finite:
        # a NaN/Inf in either input makes the change non-finite, so its sum screens both
        total = delta.sum()
        assert_finite(pair.base, name, chunk.base, total)
        assert_finite(pair.finetuned, name, chunk.finetuned, total)
    return delta, selection_keys(delta, name, config.strategy, config.seed, chunk.offset)


def tensor_keys(pair: CheckpointPair, name: str, config: SelectionConfig, check_finite: bool = False,
                score: Score | None = None) -> Iterator[tuple[Chunk, torch.Tensor, torch.Tensor]]:
    """(chunk, change, keys) of every chunk of one tensor, in flat order."""
    for chunk in pair.chunks(name):
        yield chunk, *chunk_keys(pair, name, chunk, config, check_finite, score)


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
                ratios: tuple[float, ...], score: Score | None = None) -> tuple[list[Cut | None], int]:
    """Per-tensor scope: each ratio's floor(numel * k / 100) largest keys of this tensor, and how
    many passes over it that took (a tensor read in one chunk is read once, its keys kept)."""
    single = len(row_blocks(pair.base.shapes[name])) == 1
    kept = [keys for _, _, keys in tensor_keys(pair, name, config, True, score)] if single else None

    def key_chunks(check_finite: bool = False):
        return iter(kept) if kept else (keys for _, _, keys in tensor_keys(pair, name, config, check_finite, score))

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
    score: Score | None = None  # what was ranked in place of config.metric (see `select`)

    @property
    def total(self) -> int:
        return sum(self.numel.values())

    def selected_count(self, ratio_index: int) -> int:
        """Exactly floor(n * k / 100) for scope global; the sum of the per-tensor counts otherwise."""
        if self.config.scope == "global":
            return target_count(self.total, self.ratios[ratio_index])
        return sum(target_count(self.numel[n], self.ratios[ratio_index]) for n in self.names)

    def cutter(self, name: str) -> TensorCuts:
        """Feed it tensor `name`'s key chunks in flat order (`keys`); it gives each ratio's mask."""
        return TensorCuts(self.cuts[name])

    def keys(self, pair: CheckpointPair, name: str) -> Iterator[tuple[Chunk, torch.Tensor, torch.Tensor]]:
        """(chunk, ranked quantity, keys) of every chunk of tensor `name`, as the selection ranked them."""
        return tensor_keys(pair, name, self.config, score=self.score)


def select(pair: CheckpointPair, ratios, config: SelectionConfig, progress: bool = True,
           score: Score | None = None) -> Selection:
    """The exact selection of every ratio of a sweep, found in a constant number of passes; `score`
    ranks a quantity of the caller's in place of `config.metric` (the strategy still applies)."""
    ratios = parse_ratios(ratios)
    names = pair.region_names(config.region)
    numel = {n: pair.numel(n) for n in names}
    if config.scope == "tensor":
        cuts, passes = {}, 1
        for name in progress_bar(names, "thresholds per tensor", progress):
            cuts[name], tensor_passes = tensor_cuts(pair, name, config, ratios, score)
            passes = max(passes, tensor_passes)
        return Selection(config, ratios, names, numel, cuts, passes=passes, score=score)

    high = torch.zeros(_N_HIGH, dtype=torch.long)
    for name in progress_bar(names, "pass 1: key histogram", progress):
        for _, _, keys in tensor_keys(pair, name, config, check_finite=True, score=score):
            high += _high_histogram(keys)

    def boundary_histograms(bins: list[int]):
        # Each tensor's own boundary histograms are kept (a few KB per tensor), so the keys equal
        # to a threshold can be counted per tensor, and ties handed out, without another pass.
        # One block allocated up front: small per-tensor results allocated between the passes'
        # large temporaries would pin the heap and keep hundreds of MB of freed memory resident.
        slot = _bin_slots(bins)
        counts = torch.zeros(len(names), len(bins), _N_LOW, dtype=torch.int32)
        for row, name in enumerate(progress_bar(names, "pass 2: boundary refinement", progress)):
            for _, _, keys in tensor_keys(pair, name, config, score=score):
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
    return Selection(config, ratios, names, numel, cuts, passes=2 if any(ks) else 1, score=score)
