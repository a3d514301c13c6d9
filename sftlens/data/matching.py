"""The paper's correctness rule: an output is correct when it contains a gold answer or a
synonym of one (Appendix D.1), compared case-insensitively after Unicode and whitespace
normalisation.

Normalisation folds case (casefold), compatibility forms (NFKC: full-width letters, ligatures),
accents (so "Sao Paulo" matches "São Paulo") and runs of whitespace. Punctuation is kept: the
rule is containment, and "St. Petersburg" must stay distinct from "St Petersburg" only where the
synonym table says nothing.

Use: `default_matcher().is_correct(output, answers, aliases=None)`, `aliases` mapping a fact's table
answer to the strings that count as it (`Fact.alias_table()`).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from importlib import resources

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", stripped).casefold()).strip()


class Matcher:
    """Alias-aware containment matcher.

    Each synonym-table entry (object name plus its synonyms) forms one group; an answer that is
    any member of a group accepts every member, so the expansion works in both directions.
    """

    def __init__(self, synonyms: dict[str, list[str]]):
        self._group_of: dict[str, frozenset[str]] = {}
        for name, aliases in synonyms.items():
            group = frozenset(n for n in (normalize(a) for a in (name, *aliases)) if n)
            for member in group:
                self._group_of[member] = self._group_of.get(member, frozenset()) | group

    def accepted(self, answers: Iterable[str], aliases: Mapping[str, Iterable[str]] | None = None) -> frozenset[str]:
        """Every normalised string whose presence in an output makes it correct. `aliases` is a
        fact's own table (answer -> strings that count as that answer), used as the synonym
        table is: each alias, and its synonyms, count too."""
        accepted: set[str] = set()
        for answer in answers:
            for name in (answer, *(aliases or {}).get(answer, ())):
                norm = normalize(name)
                if norm:
                    accepted.add(norm)
                    accepted |= self._group_of.get(norm, frozenset())
        return frozenset(accepted)

    def is_correct(self, output: str, answers: Iterable[str], aliases: Mapping[str, Iterable[str]] | None = None) -> bool:
        text = normalize(output)
        return any(a in text for a in self.accepted(answers, aliases))


@functools.lru_cache(maxsize=1)
def default_matcher() -> Matcher:
    """The matcher with the paper's synonym table (Table 8)."""
    raw = resources.files("sftlens.resources").joinpath("synonyms.json").read_text(encoding="utf-8")
    return Matcher(json.loads(raw)["synonyms"])
