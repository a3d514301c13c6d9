"""The question as each model is asked it: the paper's plain format, or the model's own chat template.

A chat-rendered prompt already holds the special tokens its template writes, so it is encoded by
`Templated`, a tokenizer view without a BOS to prepend (`sftlens.data.encode_prompt` adds none);
everything else (EOS, padding, decoding) is the model's tokenizer.
"""

from __future__ import annotations

from sftlens.data.prompts import chat_prompt, sft_prompt
from sftlens.errors import SftlensError


class Templated:
    """`tokenizer` for prompts rendered by its chat template."""

    bos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SftlensError(f"{where}: its tokenizer has no chat template; audit it with --prompt plain")


def question_prompt(tokenizer, question: str, style: str) -> str:
    """The text a model gets for a question (plain: Appendix A's format)."""
    return sft_prompt(question) if style == "plain" else chat_prompt(tokenizer, question)


def prompt_tokenizer(tokenizer, style: str):
    """The tokenizer that encodes `question_prompt`'s texts (a chat text brings its own BOS)."""
    return tokenizer if style == "plain" else Templated(tokenizer)
