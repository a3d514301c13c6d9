"""Batched decoding that drops every sequence from the batch the moment it is over.

`generate` keeps a finished sequence in its batch (padding it along) until the whole batch ends, and
cannot know that a probe sample which already names the answer is decided. `decode` removes such
rows from the running batch and from its KV cache at the step they end, so each step only computes
the sequences still running. Which token a row picks is up to the caller's `choose`, given the
rows' float32 next-token scores and their indices in the batch as it started: a row's draws never
depend on which other rows are still running.

A row ends at its end-of-sequence token (kept, as `generate` keeps it), at `max_new_tokens`, or when
the caller's `ended(row, token_ids)` says so (a newline for the probe's stop-at-newline, a decided
sample). The prompt is run once and its cache repeated for the `repeats` continuations of each
prompt (what `num_return_sequences` does, without re-encoding the prompt per continuation).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

Choose = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Ended = Callable[[list[int], list[list[int]]], list[bool]]


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def greedy(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return scores.argmax(dim=-1)


def _cache_argument(lm) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; the old name still works there but warns.
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


class _ReservedLayer(DynamicLayer):
    """A layer cache whose keys and values live in buffers sized for the whole decode: each step writes
    its position in place. The stock layer concatenates, copying the whole cache at every step (40 %
    of a step's time for SmolLM2-135M at 250 sequences on CPU)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.is_initialized, self.device, self.length = True, keys.device, keys.shape[-2]
        self.key_buffer = self._reserve(keys, capacity)
        self.value_buffer = self._reserve(values, capacity)
        self._expose()

    def _reserve(self, states: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = states.new_empty((*states.shape[:2], capacity, states.shape[3]))
        buffer[:, :, :states.shape[2]] = states
        return buffer

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        capacity = self.key_buffer.shape[2]
        self.key_buffer = self._reserve(self.keys[indices], capacity)
        self.value_buffer = self._reserve(self.values[indices], capacity)
        self._expose()


def _reserve_cache(cache, capacity: int) -> None:
    """Swap every plain dynamic layer of `cache` for a reserved one; other layer kinds (sliding
    windows, recurrent states) and caches without layers stay as they are: correct, only slower."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or ()):
        if type(layer) is DynamicLayer and layer.keys is not None and layer.keys.numel():
            layers[i] = _ReservedLayer(layer.keys, layer.values, capacity)


@torch.inference_mode()
def decode(lm, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None, pad_id: int,
           choose: Choose = greedy, repeats: int = 1, ended: Ended | None = None) -> list[list[int]]:
    """New token ids of `repeats` continuations of each prompt (token ids, BOS included), prompt-major:
    row i * repeats + j is continuation j of prompt i."""
    device = lm.device
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_argument(lm)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = _returned_cache(out)
    scores = out.logits[:, -1].float()
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        scores = scores.repeat_interleave(repeats, dim=0)
        mask = mask.repeat_interleave(repeats, dim=0)
    _reserve_cache(cache, ids.shape[1] + max_new_tokens)
    batch = _Batch(torch.arange(len(prompts) * repeats, device=device), mask,
                   positions[:, -1].repeat_interleave(repeats))
    tokens: list[list[int]] = [[] for _ in range(len(batch.rows))]
    for step in range(max_new_tokens):
        live = batch.live_index()
        chosen = choose(scores if live is None else scores[live], batch.live_rows())
        running = _append(tokens, batch.live_rows().tolist(), chosen.tolist(), eos_id, ended)
        if step + 1 == max_new_tokens or not any(running):
            break
        next_tokens = batch.advance(chosen, running, pad_id, max_new_tokens - step - 1, cache)
        out = lm(input_ids=next_tokens[:, None], attention_mask=batch.mask, position_ids=batch.position[:, None],
                 use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        scores = out.logits[:, -1].float()
    return tokens


class _Batch:
    """The rows in the running batch: some may be over, kept until dropping them pays for the copy
    of the cache that dropping costs."""

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor, position: torch.Tensor):
        self.rows, self.mask, self.position = rows, mask, position
        self.alive = torch.ones(len(rows), dtype=torch.bool, device=rows.device)

    def live_index(self) -> torch.Tensor | None:
        return None if bool(self.alive.all()) else self.alive.nonzero().squeeze(1)

    def live_rows(self) -> torch.Tensor:
        index = self.live_index()
        return self.rows if index is None else self.rows[index]

    def advance(self, chosen: torch.Tensor, running: list[bool], pad_id: int, steps_left: int, cache) -> torch.Tensor:
        """Record which rows ended, drop the ended rows when worth it; the next input tokens."""
        next_tokens = torch.full((len(self.rows),), pad_id, dtype=chosen.dtype, device=chosen.device)
        live = self.alive.nonzero().squeeze(1)
        next_tokens[live] = chosen
        self.alive[live[~torch.tensor(running, device=live.device)]] = False
        dead = len(self.rows) - int(self.alive.sum())
        # Dropping copies the cache once (about half a step); keeping costs the dead rows every step left.
        if dead and dead * steps_left >= len(self.rows) // 2:
            keep = self.alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            self.rows, self.mask, self.position, next_tokens = self.rows[keep], self.mask[keep], self.position[keep], next_tokens[keep]
            self.alive = self.alive[keep]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.position = self.position + 1
        return next_tokens


def _append(tokens: list[list[int]], rows: list[int], chosen: list[int], eos_id: int | None,
            ended: Ended | None) -> list[bool]:
    """Append each running row's token; whether each row runs on."""
    for row, token in zip(rows, chosen):
        tokens[row].append(token)
    running = [token != eos_id for token in chosen]
    if ended is not None:
        live = [row for row, run in zip(rows, running) if run]
        stops = iter(ended(live, [tokens[row] for row in live]))
        running = [run and not next(stops) for run in running]
    return running
