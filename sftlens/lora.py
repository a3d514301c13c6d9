"""LoRA for `sftlens train --method lora` (PEFT, extra `sftlens[lora]`): which modules get adapters, the
adapters themselves, and the merge that makes the output a plain HF folder with the base's tensor names.

Targets: `lora_targets` None = `default_lora_targets(net)` (the linear layers inside the transformer
blocks, GPT-2's `Conv1D` trained with PEFT's `fan_in_fan_out`; never the embeddings or the head); the
targets chosen are printed and written as the run record's `config.lora_targets`, while the run key keeps
None (so a config naming its targets keeps the key it had when Llama's projections were the default).
Every other weight is frozen; `save_merged` merges the adapters (`merge_and_unload`) in one process (one
process or DDP; not FSDP/ZeRO-3), so the output has the base's tensor names with only the targets changed
(by a rank-`lora_rank` update). Targets missing from the model, none found, or PEFT not installed are
one-line errors before anything is written. `TrainConfig`'s `method` and `lora_*` fields carry
`omit_unless = ("method", "lora")` (`sftlens.config`), so full-SFT run keys and study unit keys are those
from before LoRA existed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from sftlens.errors import SftlensError


def require_peft() -> None:
    try:
        importlib.import_module("peft")
    except ImportError:
        raise SftlensError("method = 'lora' needs PEFT: pip install 'sftlens[lora]'") from None


def linear_layers(net) -> list[tuple[str, torch.nn.Module]]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return [(name, module) for name, module in net.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]


def default_lora_targets(net) -> tuple[str, ...]:
    """Names of the linear layers inside the transformer blocks (attention and MLP, fused projections
    such as `query_key_value`, `qkv_proj`, `c_attn` included), in model order. Blocks are the
    `sftlens.weights` layers (`layers.N`, `h.N`, ...), so the embeddings and the output head are never
    targets; PEFT matches a name wherever it occurs, so a name also used outside the blocks is left out."""
    from sftlens.weights.checkpoints import layer_index

    inside = [name.rsplit(".", 1)[-1] for name, _ in linear_layers(net) if layer_index(f"{name}.") is not None]
    outside = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules() if layer_index(f"{name}.") is None}
    return tuple(name for name in dict.fromkeys(inside) if name not in outside)


def lora_targets(net, model: str, config) -> tuple[str, ...]:
    if config.lora_targets is None:
        targets = default_lora_targets(net)
        if not targets:
            raise SftlensError(f"lora_targets: no linear layer found in the transformer blocks of {model}; "
                               "name the modules with --lora-targets")
        return targets
    names = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules()}
    missing = [target for target in config.lora_targets if target not in names]
    if missing:
        raise SftlensError(f"lora_targets: {', '.join(missing)} not found in the modules of {model}")
    return config.lora_targets


def with_lora(net, targets: tuple[str, ...], config):
    """`net` with LoRA adapters on the modules named `targets`, every other weight frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # Conv1D stores its weight as (in, out): PEFT needs fan_in_fan_out to merge it the right way round
    conv1d = any(isinstance(module, Conv1D) for name, module in linear_layers(net)
                 if name.rsplit(".", 1)[-1] in targets)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(targets), fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(net, lora)


def save_merged(trainer, staged: Path) -> None:
    """The LoRA update folded into the base weights, saved under the base model's tensor names.

    Merging needs the whole model in one process, so a LoRA run's adapters must not be sharded
    (one process or DDP; not FSDP/ZeRO-3)."""
    if trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(staged))
        trainer.processing_class.save_pretrained(str(staged))
