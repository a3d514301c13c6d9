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
from typing import Callable

import torch

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
    position = positions[:, -1].repeat_interleave(repeats)
    rows = torch.arange(len(prompts) * repeats, device=device)
    tokens: list[list[int]] = [[] for _ in range(len(rows))]
    for step in range(max_new_tokens):
        chosen = choose(scores, rows)
        running = _append(tokens, rows.tolist(), chosen.tolist(), eos_id, ended)
        if step + 1 == max_new_tokens or not any(running):
            break
        if not all(running):
            keep = torch.tensor(running, device=device)
            index = keep.nonzero().squeeze(1)
            rows, chosen, mask, position = rows[keep], chosen[keep], mask[keep], position[keep]
            cache.batch_select_indices(index)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        position = position + 1
        out = lm(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None],
                 use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        scores = out.logits[:, -1].float()
    return tokens


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
