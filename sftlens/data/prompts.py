"""The SFT prompt format of the paper's Appendix A, shared by split, train, evaluate and kl.

A training example is BOS + "<question> {question} <answer>" followed by " {answer} " + EOS;
the loss covers the completion only. Text is stored without BOS/EOS, which are tokenizer-specific
and added at encoding time.
"""

from __future__ import annotations

from sftlens.errors import SftlensError


def sft_prompt(question: str) -> str:
    return f"<question> {question.strip()} <answer>"


def sft_completion(answer: str) -> str:
    return f" {answer.strip()} "


def chat_prompt(tokenizer, question: str) -> str:
    """A question in the model's own chat template, ready for its answer. The text holds the special
    tokens the template writes (its BOS too): encode it without adding any."""
    if not getattr(tokenizer, "chat_template", None):
        raise SftlensError("the model's tokenizer has no chat template; ask question-only topics with "
                           "--question-prompt plain")
    return tokenizer.apply_chat_template([{"role": "user", "content": question.strip()}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's BOS in front (when it has one), no EOS."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids
