"""Tiny in-process models for tests: a real byte-level BPE tokenizer trained in milliseconds and a
random-init Llama, plus saving them as a standard HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftlens.data import load_templates
from sftlens.io import atomic_directory

TINY_ANSWERS = ["France", "Germany", "Italy", "Spain", "United States of America", "Japan"]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A real byte-level BPE tokenizer trained in-process (milliseconds) for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        corpus = [t for rel in load_templates().values() for t in (rel.question, *rel.mapping_templates)]
        corpus += ["France Paris Germany Berlin Italy Rome United States of America London"]
    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
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
