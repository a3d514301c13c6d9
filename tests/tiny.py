"""Tiny in-process models for tests: a real byte-level BPE tokenizer trained in milliseconds and a
random-init Llama, plus saving them as a standard HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftlens.data import load_templates
from sftlens.io import atomic_directory

TINY_ANSWERS = ["France", "Germany", "Italy", "Spain", "United States of America", "Japan"]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512, *, bos: str | None = "<bos>",
                   eos: str = "<eos>", pad: str | None = "<pad>"):
    """A real byte-level BPE tokenizer trained in-process (milliseconds) for tests; `bos`/`pad` None:
    none, as Qwen2 has no BOS and GPT-2 no padding token (its BOS is its EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        corpus = [t for rel in load_templates().values() for t in (rel.question, *rel.mapping_templates)]
        corpus += ["France Paris Germany Berlin Italy Rome United States of America London"]
    specials = list(dict.fromkeys(token for token in (bos, eos, pad, "<unk>") if token))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>"
    )


def tiny_model(seed: int = 0, hidden_size: int = 32, layers: int = 2, tokenizer=None):
    """A random-init Llama with a real tokenizer, small enough to train in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


# Tiny random models of each family tested (tests/test_families.py): the family's config class and
# what it differs in. Mistral's window (8) and Gemma 2's local layers are shorter than any prompt.
_GPT2_SPECIALS = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None}
FAMILY_TOKENIZERS = {"llama": {}, "qwen2": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>"},
                     "mistral": {}, "gemma2": {}, "gpt_neox": _GPT2_SPECIALS, "phi3": {}, "gpt2": _GPT2_SPECIALS}


def _family_config(family: str, vocab: int, ids: dict, hidden: int = 32, layers: int = 2):
    import transformers

    llama_like = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    if family == "llama":
        return transformers.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=8, tie_word_embeddings=False)
    if family == "gemma2":
        return transformers.Gemma2Config(**llama_like, head_dim=8, sliding_window=8, query_pre_attn_scalar=8)
    if family == "phi3":
        return transformers.Phi3Config(**llama_like, tie_word_embeddings=False)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=4, rotary_pct=0.5,
                                          max_position_embeddings=256, tie_word_embeddings=False, **ids)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                                       **ids)
    raise ValueError(f"unknown family {family!r}")


def family_model(family: str, seed: int = 0, tokenizer=None):
    """(random-init model, tokenizer) of a family in FAMILY_TOKENIZERS, tiny like `tiny_model`."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer(**FAMILY_TOKENIZERS[family])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           # configs with a default padding id outside a tiny vocabulary (Phi-3's 32000) need one
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_family_config(family, len(tokenizer), ids)).eval(), tokenizer


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a model + tokenizer as a standard HF folder, atomically."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def write_tiny_data(root: Path, per_file: int = 12) -> Path:
    """An EntityQuestions-shaped folder: every relation, every split, `per_file` records."""
    for split in ("train", "dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for r, (relation, tpl) in enumerate(load_templates().items()):
            records = []
            for i in range(per_file):
                subject = f"Entity {relation} {split} {i}"
                answers = [TINY_ANSWERS[(i + r) % len(TINY_ANSWERS)]]
                if i % 5 == 4:
                    answers.append(TINY_ANSWERS[(i + r + 1) % len(TINY_ANSWERS)])
                records.append({"question": tpl.question.format(subject=subject), "answers": answers})
            (root / split / f"{relation}.{split}.json").write_text(json.dumps(records))
    return root
