"""How many prompts a probe batch holds: on CPU, as many sequences as pay off within a share of free
memory; on CUDA, a large start that accelerate shrinks after an out-of-memory error (`store`)."""

from __future__ import annotations

import os

import torch

from sftlens.probe.records import ProbeConfig

# CPU batches beyond this many sequences stop paying off (the matmuls are already compute-bound).
CPU_MAX_SEQUENCES = 256
# Share of available memory the CPU batch may take (KV cache plus vocabulary-wide score buffers).
CPU_MEMORY_SHARE = 0.25
CUDA_START_PROMPTS = 512


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def _bytes_per_sequence(lm, prompt_len: int, config: ProbeConfig) -> int:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = torch.finfo(lm.dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * (prompt_len + config.max_new_tokens) * element
    # Scores, noise, softmax and mask buffers over the vocabulary, a few fp32 copies each step.
    scores = 6 * cfg.vocab_size * 4
    return kv + scores


def cpu_batch_size(lm, prompt_len: int, config: ProbeConfig) -> int:
    """Prompts per batch on CPU: as many sequences as pay off, within a share of free memory."""
    by_memory = int(_available_memory() * CPU_MEMORY_SHARE) // _bytes_per_sequence(lm, prompt_len, config)
    return max(1, min(by_memory, CPU_MAX_SEQUENCES) // config.samples)
