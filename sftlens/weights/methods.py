"""Repair methods: weight-space edits between a base and a fine-tuned checkpoint with the same
tensor names, for a whole sweep of one hyperparameter at once.

A method turns the sorted values of a sweep into an `Edit`: the region's tensors and, tensor by
tensor, a generator of (chunk, one edited block per value, one count per value of the elements
set to their base value). It never sees shards, folders or models: `sftlens.weights.apply` writes
the blocks into HF folders (one read of the weights for the whole sweep) or copies them into a
loaded model. Outside the region every tensor stays the fine-tuned one.

Adding a method = one function below (~30 lines) and one `METHODS` entry naming its knob, the
knob's range, its neutral value (the one that gives back the fine-tuned model bit for bit) and the
`RepairConfig` settings it reads (they, and only they, enter its outputs' keys). The methods are
data-free but one: `guided` reads per-element fact importances from a file (`RepairConfig.importances`,
see `sftlens.weights.guided`), and the file's key, not its path, enters its keys.

Arithmetic: a mix of base b and fine-tuned f with weight w is `torch.lerp(b, f, w)` in fp32 (fp64
for fp64 weights), rounded to the tensor's dtype; lerp computes b + w (f - b) for w < 0.5 and
f - (1 - w) (f - b) otherwise, so w = 1 is f and w = 0 is b exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from sftlens.errors import SftlensError
from sftlens.weights.checkpoints import CheckpointPair, Chunk, assert_finite, check_region
from sftlens.weights.guided import Importances, score_source
from sftlens.weights.selection import (
    Selection,
    SelectionConfig,
    parse_numbers,
    parse_ratios,
    random_keys,
    select,
)
from sftlens.weights.spectral import spectral_blocks

Blocks = Iterator[tuple[Chunk, list[torch.Tensor], list[int]]]


@dataclass(frozen=True)
class Edit:
    """One method's sweep over a checkpoint pair, ready to be applied block by block."""

    values: tuple[float, ...]
    names: list[str]  # the region's floating-point tensors, sorted
    tensor: Callable[[str, Sequence[int]], Blocks]  # blocks of a tensor for the values at these indices
    passes: int = 0  # passes over the weights before the one that applies the edit


@dataclass(frozen=True)
class RepairConfig:
    """Which repair, and the settings it reads. Per method (defaults in brackets):
    restore: metric [relative], scope [global], strategy [top], seed, region;
    trim: metric [absolute], scope [tensor] (TIES trims each tensor), region;
    dare: seed (of the drop mask), region; wise, spectral: region; guided: importances (required), region.
    Settings a method does not read are ignored (and do not enter its keys); `region` defaults to the
    layers without norms for all."""

    method: Literal["restore", "wise", "dare", "trim", "spectral", "guided"] = field(
        default="restore", metadata={"help": "restore (the paper), wise (WiSE-FT), dare (DARE), trim (TIES' trim), "
                                             "spectral (Gavish-Donoho hard threshold of each matrix's update) or "
                                             "guided (the top changes weighted by forgotten/learned fact importances)"})
    metric: Literal["relative", "absolute", "relative_nonzero"] | None = field(
        default=None, metadata={"help": "restore/trim: rank elements by this change "
                                        "(default: relative for restore, absolute for trim)"})
    scope: Literal["global", "tensor"] | None = field(
        default=None, metadata={"help": "restore/trim: k %% of all region elements, or of each tensor "
                                        "(default: global for restore, tensor for trim)"})
    region: str = field(
        default="body", metadata={"help": "tensors edited: body (layers without norms), attention, mlp, "
                                          "embeddings, all, or a regex; the others stay fine-tuned"})
    strategy: Literal["top", "bottom", "random"] = field(
        default="top", metadata={"help": "restore: the largest changes, the smallest, or a seeded random set"})
    seed: int = field(default=0, metadata={"help": "restore: seed of the random strategy; dare: seed of the drop mask"})
    importances: str | None = field(
        default=None, metadata={"help": "guided: the fact importances file (an audit writes "
                                        "DIR/steps/importances.safetensors)", "omit_unless": ("method", "guided")})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown repair method {self.method!r} (known: {', '.join(METHODS)})")
        check_region(self.region)

    def _resolved(self) -> dict:
        defaults = METHODS[self.method].defaults
        return {"metric": self.metric or defaults.get("metric", "relative"),
                "scope": self.scope or defaults.get("scope", "global"), "region": self.region,
                "strategy": defaults.get("strategy", self.strategy), "seed": self.seed}

    def settings(self, importances: bool = True) -> dict:
        """The method's settings with its defaults filled in: what enters its outputs' keys (the
        importances: the file's own key, so a moved file keeps its outputs' keys; left out with
        `importances=False`, for a caller that keys the file otherwise: a study's importance unit)."""
        resolved = self._resolved()
        read = [n for n in METHODS[self.method].settings if importances or n != "importances"]
        if "importances" in read:
            resolved["importances"] = self.importances_file().key
        return {name: resolved[name] for name in read}

    def selection(self) -> SelectionConfig:
        """The selection of restore and trim."""
        return SelectionConfig(**self._resolved())

    def importances_file(self) -> Importances:
        """The importances the guided repair reads (one-line errors: none given, missing, not one)."""
        if self.importances is None:
            raise SftlensError(f"the {self.method} repair needs fact importances: --importances FILE (an audit "
                               "writes DIR/steps/importances.safetensors)")
        return Importances.open(self.importances)


def mix(base: torch.Tensor, finetuned: torch.Tensor, weight: float) -> torch.Tensor:
    """base + weight (finetuned - base) in fp32 or wider, in the finetuned dtype (see the module doc)."""
    wide = torch.promote_types(finetuned.dtype, torch.float32)
    return torch.lerp(base.to(wide), finetuned.to(wide), weight).to(finetuned.dtype)


def checked_chunks(pair: CheckpointPair, name: str) -> Iterator[Chunk]:
    """The chunks of a tensor, each checked for NaN/Inf (methods without a selection pass)."""
    for chunk in pair.chunks(name):
        assert_finite(pair.base, name, chunk.base)
        assert_finite(pair.finetuned, name, chunk.finetuned)
        yield chunk


def selection_edit(pair: CheckpointPair, selection: Selection, reset_selected: bool = True) -> Edit:
    """Set each ratio's selected elements (or, with reset_selected False, all the others) to base."""

    def tensor(name: str, which: Sequence[int]) -> Blocks:
        cutter = selection.cutter(name)
        for chunk, _, keys in selection.keys(pair, name):
            resets = [cutter.mask(i, keys) if reset_selected else ~cutter.mask(i, keys) for i in which]
            yield (chunk, [torch.where(reset, chunk.base, chunk.finetuned) for reset in resets],
                   [int(torch.count_nonzero(reset)) for reset in resets])

    return Edit(selection.ratios, selection.names, tensor, selection.passes)


def restore(pair: CheckpointPair, values: tuple[float, ...], config: RepairConfig, progress: bool) -> Edit:
    """The paper's restoration: the selected k % of elements (exactly floor(n k / 100), see
    `sftlens.weights.selection`) take their base values."""
    return selection_edit(pair, select(pair, values, config.selection(), progress))


def trim(pair: CheckpointPair, values: tuple[float, ...], config: RepairConfig, progress: bool) -> Edit:
    """TIES' trim step: keep the top d % of |ft - base| (exactly floor(n d / 100) elements, per
    tensor by default as TIES, or over the whole region with scope global), reset the rest to base.
    Ties are broken like every selection: sorted tensor name, then flat index. TIES' sign election
    and disjoint mean are no-ops for a single fine-tuned model (every kept element agrees with its
    own sign and is averaged with itself), so trim is all of TIES here."""
    return selection_edit(pair, select(pair, values, config.selection(), progress), reset_selected=False)


def wise(pair: CheckpointPair, values: tuple[float, ...], config: RepairConfig, progress: bool) -> Edit:
    """WiSE-FT: theta = base + alpha (ft - base), alpha in [0, 1] (1 = fine-tuned, 0 = base).
    Extrapolation (alpha > 1) is task-vector scaling, not a repair, so it is refused."""

    def tensor(name: str, which: Sequence[int]) -> Blocks:
        for chunk in checked_chunks(pair, name):
            yield (chunk, [mix(chunk.base, chunk.finetuned, values[i]) for i in which],
                   [chunk.base.numel() if values[i] == 0 else 0 for i in which])

    return Edit(values, pair.region_names(config.region), tensor)


def drop_threshold(p: float) -> int:
    """Keys below this are dropped: keys are spread over [0, 2**31), so a share p of them."""
    return round(p * (1 << 31))


def dare(pair: CheckpointPair, values: tuple[float, ...], config: RepairConfig, progress: bool) -> Edit:
    """DARE: drop each element of the update ft - base with probability p (it takes its base value)
    and rescale the kept ones, theta = base + (ft - base) / (1 - p). An element is dropped when its
    seeded random key (`random_keys`: a hash of (seed, tensor name, flat index)) is below p 2**31,
    so the mask does not depend on blocks or shards, and the mask of p is inside the mask of p' > p."""

    def tensor(name: str, which: Sequence[int]) -> Blocks:
        for chunk in checked_chunks(pair, name):
            keys = random_keys(name, config.seed, chunk.offset, chunk.base.shape)
            drops = [keys < drop_threshold(values[i]) for i in which]
            yield (chunk, [torch.where(drop, chunk.base, mix(chunk.base, chunk.finetuned, 1 / (1 - values[i])))
                           for drop, i in zip(drops, which)],
                   [int(torch.count_nonzero(drop)) for drop in drops])

    return Edit(values, pair.region_names(config.region), tensor)


def spectral(pair: CheckpointPair, values: tuple[float, ...], config: RepairConfig, progress: bool) -> Edit:
    """DG-Hard: each matrix keeps the singular directions of ft - base above c times the
    Gavish-Donoho optimal hard threshold (c = 1: the threshold itself; c = 0: ft bit for bit); other
    tensors stay fine-tuned (see `sftlens.weights.spectral`). One SVD per matrix serves every value
    asked of `tensor` at once: writing a sweep decomposes each matrix once, while `repaired_models`
    asks one value at a time and so decomposes again per value (caching every matrix's factors
    would hold more than the model)."""

    def tensor(name: str, which: Sequence[int]) -> Blocks:
        return spectral_blocks(pair, name, [values[i] for i in which])

    return Edit(values, pair.region_names(config.region), tensor)


def guided(pair: CheckpointPair, values: tuple[float, ...], config: RepairConfig, progress: bool) -> Edit:
    """Fact-guided restoration: the exactly floor(n k / 100) region elements of the top score
    |f - b| Fbar_forgotten / (Fbar_learned + eps) take their base values (`sftlens.weights.guided`:
    the formula, the importances); k = 0, the neutral value, selects nothing (f bit for bit)."""
    names = pair.region_names(config.region)
    score = score_source(config.importances_file(), pair, names)
    ranked = SelectionConfig(metric="absolute", scope="global", region=config.region, strategy="top")  # metric unused
    positive = tuple(v for v in values if v > 0)
    found = select(pair, positive, ranked, progress, score) if positive else None
    zeros = [None] * (len(values) - len(positive))  # k = 0, sorted first: no element
    cuts = {n: zeros + (found.cuts[n] if found else []) for n in names}
    selection = Selection(ranked, tuple(values), names, {n: pair.numel(n) for n in names}, cuts,
                          found.passes if found else 0, score)
    return selection_edit(pair, selection)


@dataclass(frozen=True)
class Method:
    """A method, its knob and the knob's range (`closed`: whether each end is allowed)."""

    edit: Callable[[CheckpointPair, tuple[float, ...], RepairConfig, bool], Edit]
    knob: str
    low: float
    high: float
    closed: tuple[bool, bool]
    neutral: float  # the value that leaves the fine-tuned model as it is
    settings: tuple[str, ...]  # the RepairConfig fields it reads, besides the method
    defaults: dict = field(default_factory=dict)  # its defaults of the shared settings
    default_values: tuple[float, ...] = ()  # the sweep when none is given (none: values are required)

    def admits(self, value: float) -> bool:
        above = value >= self.low if self.closed[0] else value > self.low
        below = value <= self.high if self.closed[1] else value < self.high
        return above and below

    @property
    def interval(self) -> str:
        return f"{'[('[not self.closed[0]]}{self.low:g}, {self.high:g}{'])'[not self.closed[1]]}"


METHODS: dict[str, Method] = {
    "restore": Method(restore, "ratio", 0, 100, (False, True), 0.0, ("metric", "scope", "region", "strategy", "seed"),
                      {"metric": "relative", "scope": "global"}),
    "wise": Method(wise, "alpha", 0, 1, (True, True), 1.0, ("region",)),
    "dare": Method(dare, "p", 0, 1, (True, False), 0.0, ("region", "seed")),
    "trim": Method(trim, "d", 0, 100, (False, True), 100.0, ("metric", "scope", "region"),
                   {"metric": "absolute", "scope": "tensor", "strategy": "top"}),
    # c scales the Gavish-Donoho threshold: c = 1 (the default sweep) is DG-Hard itself
    "spectral": Method(spectral, "c", 0, math.inf, (True, False), 0.0, ("region",), default_values=(1.0,)),
    # k as restore's ratio; the importances come from facts (an audit's dev slice), so values are required
    "guided": Method(guided, "k", 0, 100, (False, True), 0.0, ("region", "importances"),
                     {"metric": "absolute", "scope": "global", "strategy": "top"}),
}


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise SftlensError(f"unknown repair method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def parse_values(method: str, values) -> tuple[float, ...]:
    """A sweep's values of `method`'s knob: sorted, de-duplicated, each in the knob's range
    (restore: ratios in (0, 100], as `parse_ratios`)."""
    spec = method_of(method)
    if method in ("restore", "guided"):
        return parse_ratios(values)
    return parse_numbers(values, f"{method} {spec.knob}", spec.admits, spec.interval, f"{method} {spec.knob} values")
