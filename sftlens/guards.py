"""Training-time guards against forgetting: one registry (`GUARDS`), like the repair methods' `METHODS`.

A guard is one knob applied while `sftlens train` fine-tunes (`--guard NAME=VALUE`, `TrainConfig.guard`):

- `replay` r in [0, 1): a share r of every batch's examples are QA rows of facts the base already answers
  right (level 4 in its probe store, training split only, never the SFT set's own facts), in the SFT format
  (KnownPatch, arXiv 2511.02626). Each batch holds B(1 - r) SFT rows and rB replayed rows, so the run takes
  ceil(N / (B(1 - r))) steps instead of ceil(N / B); rB must be a whole number.
- `l2` lambda >= 0: loss + lambda * sum over the trained parameters of (theta - theta_base)^2 (L2-SP,
  arXiv 1802.01483).
- `kl` lambda >= 0: loss + lambda * KL(p_theta || p_base), averaged over the batch's completion tokens (the
  tokens the SFT loss reads), the base model in inference mode: one extra forward pass per step
  ("RL's Razor", arXiv 2509.04259; self-distillation, arXiv 2402.13669).
- `freeze` f in [0, 1]: the lowest floor(f L) of the L transformer blocks and, for any f > 0, the input
  embeddings get no update (a model with tied embeddings keeps its output head too) ("Spurious
  Forgetting", arXiv 2501.13453).
- `mofo` a in (0, 1]: after each optimizer step only the floor(a n) elements of each n-element tensor with
  the largest |Adam first moment| keep their update; the others get their values back, while the moments
  keep accumulating (MoFO, arXiv 2407.20999). Ties at the threshold go to the lower flat index.

Every guard's neutral value (replay 0, l2 0, kl 0, freeze 0, mofo 1) runs its machinery and gives plain
SFT bit for bit. LoRA, the other way of learning less and forgetting less, stays `--method lora`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sftlens.errors import SftlensError

IGNORE_INDEX = -100  # label value the HF causal-LM loss skips
KNOWN_LEVEL = 4  # the mastery level of a fact the base answers right (replay's pool)


@dataclass(frozen=True)
class Guard:
    knob: str  # what the value means
    low: float
    high: float
    low_open: bool
    high_open: bool
    neutral: float  # the value that gives plain SFT
    cost: str  # what it costs, in words
    weight_copies: int  # fp32 copies of the trained weights (or the model) it holds in memory

    def check(self, name: str, value: float) -> None:
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above or math.isnan(value):
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            raise ValueError(f"guard {name}: {value:g} is outside {interval}")


GUARDS: dict[str, Guard] = {
    "replay": Guard("share r of each batch's examples that replay facts the base knows", 0, 1, False, True, 0.0,
                    "more steps: ceil(N / (B(1 - r))) instead of ceil(N / B)", 0),
    "l2": Guard("lambda of lambda ||theta - theta_base||^2 over the trained parameters (L2-SP)", 0, math.inf,
                False, True, 0.0, "a copy of the trained weights; one pass over them per step", 1),
    "kl": Guard("lambda of lambda KL(p_theta || p_base) per completion token", 0, math.inf, False, True, 0.0,
                "the base model in memory; one extra forward pass per step", 1),
    "freeze": Guard("share f of the lowest transformer blocks frozen, with the embeddings", 0, 1, False, False, 0.0,
                    "less: no gradient or optimizer state for the frozen tensors", 0),
    "mofo": Guard("share a of each tensor's elements updated per step (largest |Adam first moment|)", 0, 1, True,
                  False, 1.0, "a copy of the trained weights; an exact top-k selection over each tensor's moments per step", 1),
}


def parse_guard(spec: str) -> tuple[str, float]:
    """`NAME=VALUE` -> (name, value), checked against the registry (ValueError naming what is wrong)."""
    name, sep, text = spec.partition("=")
    name = name.strip()
    if "," in spec:
        raise ValueError(f"guard {spec!r}: one guard per run (NAME=VALUE)")
    if name not in GUARDS:
        raise ValueError(f"guard {name!r} is unknown (known: {', '.join(GUARDS)})")
    try:
        value = float(text) if sep else math.nan
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise ValueError(f"guard {spec!r}: expected {name}=VALUE with a number ({GUARDS[name].knob})")
    GUARDS[name].check(name, value)
    return name, value


def guard_spec(name: str, value: float) -> str:
    """The one spelling of a guard setting (what enters run keys and records)."""
    return f"{name}={value!r}"


def guard_work(name: str, value: float) -> float:
    """Training examples a guarded run reads per SFT example (replay adds its rows; plans scale by it)."""
    return 1 / (1 - value) if name == "replay" else 1.0


def replay_per_batch(share: float, batch_size: int) -> int:
    """Replayed rows per batch: share x batch size, which must be a whole number."""
    rows = share * batch_size
    if abs(rows - round(rows)) > 1e-9:
        raise ValueError(f"guard replay={share:g} with batch size {batch_size} gives {rows:g} rows per batch; "
                         f"use a multiple of 1/{batch_size}")
    return round(rows)


# --- replay ----------------------------------------------------------------------------------------


def known_rows(records: dict, facts, exclude: set[str] = frozenset()) -> list[dict]:
    """SFT rows of the facts the base answers right: level 4 in its probe `records`, training split only (no
    test or dev fact ever enters training), none of `exclude` (the SFT set's own facts), in fact-id order."""
    from sftlens.data.rows import split_row  # the one spelling of an SFT row

    known = [f for f in facts if f.split == "train" and f.id not in exclude
             and f.id in records and records[f.id].level == KNOWN_LEVEL]
    return [split_row(f, KNOWN_LEVEL) for f in sorted(known, key=lambda f: f.id)]


def replay_order(n_sft: int, pool: int, batch_size: int, per_batch: int, seed: int) -> list[tuple[str, int]]:
    """The training order with replay: batches of `batch_size - per_batch` SFT examples (shuffled by `seed`;
    the last batch may be short) each followed by `per_batch` replayed examples, cycling through the pool in
    a seeded shuffle. Returns ("sft" | "replay", index) per example."""
    sft = list(range(n_sft))
    random.Random(seed).shuffle(sft)
    replayed = list(range(pool))
    random.Random(f"{seed}-replay").shuffle(replayed)
    step, order, used = batch_size - per_batch, [], 0
    for start in range(0, n_sft, step):
        order += [("sft", i) for i in sft[start:start + step]]
        for _ in range(per_batch):
            order.append(("replay", replayed[used % pool]))
            used += 1
    return order


def replays(config) -> bool:
    """Whether a TrainConfig's run mixes replayed rows into its batches (replay at a value above 0)."""
    if config.guard is None:
        return False
    name, value = parse_guard(config.guard)
    return name == "replay" and replay_per_batch(value, config.batch_size) > 0


def replay_pool(config, replay: list[dict] | None, sft_path: Path) -> list[dict] | None:
    """The known facts a replaying run mixes in (None for any other run); a missing pool is an error."""
    if not replays(config):
        return None
    if not replay:
        raise SftlensError(f"guard {config.guard}: no known facts to replay for {sft_path} "
                           "(give the base's probe store: --probe-store, and its facts)")
    return replay


def mixed_examples(examples: list[dict], pool: list[dict], replay: list[dict], config,
                   guard: ActiveGuard) -> tuple[list[dict], list[str]]:
    """The SFT examples with the replayed ones mixed into every batch, in training order, and the replayed
    fact ids in order of first use."""
    per_batch = replay_per_batch(guard.value, config.batch_size)
    order = replay_order(len(examples), len(pool), config.batch_size, per_batch, config.seed)
    mixed = [examples[i] if kind == "sft" else pool[i] for kind, i in order]
    replayed = list(dict.fromkeys(replay[i].get("fact_id", str(i)) for kind, i in order if kind == "replay"))
    return mixed, replayed


# --- penalties --------------------------------------------------------------------------------------


def l2_penalty(model, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over the anchored (trained) parameters of (theta - theta_base)^2."""
    total = None
    for name, param in model.named_parameters():
        if name in anchor:
            term = (param.float() - anchor[name]).pow(2).sum()
            total = term if total is None else total + term
    return total


def completion_kl(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_theta || p_base) at each position that predicts a completion token, averaged over them."""
    predicts = labels[:, 1:] != IGNORE_INDEX
    log_p = torch.log_softmax(logits[:, :-1][predicts].float(), dim=-1)
    log_q = torch.log_softmax(base_logits[:, :-1][predicts].float(), dim=-1)
    if log_p.shape[0] == 0:
        return logits.sum() * 0.0
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _kth_largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of non-negative fp32 values, exactly, by a two-pass radix select on their bits (the
    bits of a non-negative float order as the floats do): a few passes over the tensor, 4x faster than
    `kthvalue` on a 28 M-element embedding, which matters since it runs on every tensor at every step."""
    bits = magnitudes.view(torch.int32)
    high = bits >> 16
    from_top = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, k))
    bucket, before = (1 << 15) - 1 - index, int(from_top[index - 1]) if index else 0
    low_from_top = torch.bincount(bits[high == bucket] & 0xFFFF, minlength=1 << 16).flip(0).cumsum(0)
    low = (1 << 16) - 1 - int(torch.searchsorted(low_from_top, k - before))
    return torch.tensor([(bucket << 16) | low], dtype=torch.int32).view(torch.float32)[0].to(magnitudes.device)


def update_mask(moment: torch.Tensor, share: float) -> torch.Tensor:
    """The floor(share n) elements with the largest |moment| (ties at the threshold: the lower flat indices),
    as a bool mask."""
    flat = moment.detach().float().abs().flatten()
    n, keep = flat.numel(), math.floor(share * flat.numel())
    if keep in (0, n):
        return torch.full_like(moment, keep == n, dtype=torch.bool)
    threshold = _kth_largest(flat, keep)
    above, ties = flat > threshold, flat == threshold
    wanted = keep - int(above.sum())
    return (above | (ties & (ties.cumsum(0) <= wanted))).view_as(moment)


# --- a guard at work --------------------------------------------------------------------------------


def frozen_names(net, share: float) -> list[str]:
    """Parameters `freeze` at `share` keeps: the lowest floor(share L) blocks and, for share > 0, the input
    embeddings (and whatever shares their tensor, such as a tied output head)."""
    from sftlens.weights.checkpoints import layer_index

    if share <= 0:
        return []
    layers = {layer_index(f"{name}.") for name, _ in net.named_parameters()} - {None}
    lowest = math.floor(share * (max(layers) + 1)) if layers else 0
    embedding = net.get_input_embeddings().weight
    return [name for name, param in net.named_parameters()
            if param is embedding or (layer_index(f"{name}.") is not None and layer_index(f"{name}.") < lowest)]


class ActiveGuard:
    """One guard on one model during one run: what it adds to the loss, to the optimizer step, to the data."""

    def __init__(self, name: str, value: float, net):
        self.name, self.value = name, value
        self.anchor: dict[str, torch.Tensor] = {}
        self.base = None
        self.frozen: list[str] = []
        if name == "freeze":
            self.frozen = frozen_names(net, value)
            for param_name, param in net.named_parameters():
                if param_name in self.frozen:
                    param.requires_grad_(False)
        elif name == "l2":
            self.anchor = {n: p.detach().float().clone() for n, p in net.named_parameters() if p.requires_grad}
        elif name == "kl":
            import copy

            self.base = copy.deepcopy(net).eval().requires_grad_(False)

    def extra_bytes(self, net) -> int:
        """Memory the guard holds beyond plain SFT (frozen tensors' saved gradients and moments not counted)."""
        trained = sum(p.numel() * 4 for p in net.parameters() if p.requires_grad)
        return {"l2": trained, "mofo": trained,
                "kl": sum(p.numel() * p.element_size() for p in net.parameters())}.get(self.name, 0)

    def penalty(self, model, inputs: dict, logits: torch.Tensor) -> torch.Tensor | None:
        if self.name == "l2":
            return self.value * l2_penalty(model, self.anchor)
        if self.name == "kl":
            if next(self.base.parameters()).device != logits.device:  # the Trainer moved the model
                self.base.to(logits.device)
            with torch.no_grad():
                base_logits = self.base(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            return self.value * completion_kl(logits, base_logits, inputs["labels"])
        return None

    def attach(self, optimizer) -> None:
        """mofo: each step's update kept only on the elements with the largest |first moment|."""
        if self.name != "mofo":
            return
        snapshot: dict[torch.Tensor, torch.Tensor] = {}

        def before(opt, args, kwargs):
            for group in opt.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        snapshot[param] = param.detach().clone()

        def after(opt, args, kwargs):
            for param, old in snapshot.items():
                moment = opt.state[param].get("exp_avg")
                if moment is None:
                    raise SftlensError("guard mofo needs an Adam optimizer (its first moment): use adamw_torch")
                param.data.copy_(torch.where(update_mask(moment, self.value), param.data, old))
            snapshot.clear()

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)


def guarded_trainer(guard: ActiveGuard | None, sequential: bool):
    """The transformers Trainer class with the guard's penalty and optimizer hook (and, for replay, the
    examples in the order given rather than shuffled: the order already mixes the batches)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class GuardedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            extra = guard.penalty(model, inputs, outputs.logits) if guard else None
            if extra is not None:
                loss = loss + extra
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if guard:
                guard.attach(optimizer)
            return optimizer

        def _get_train_sampler(self, train_dataset=None):
            if sequential:
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
            return super()._get_train_sampler(train_dataset)

    return GuardedTrainer
