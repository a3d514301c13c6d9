"""Exact tests on paired outcomes, for the study and the audit alike.

McNemar's test compares two models answering the same facts: only the discordant facts (right for
one, wrong for the other) carry information, and under "no difference" each is equally likely to
go either way, so their split is Binomial(b + c, 1/2). The exact two-sided p-value doubles the
smaller tail; for p = 1/2 the binomial is symmetric, so this equals summing the probabilities of
every outcome at most as likely as the observed one. Exact rather than the chi-square form, which
is poor for the few discordant facts a slice or a relation often has.
"""

from __future__ import annotations

import operator

from sftlens.errors import SftlensError


def mcnemar(forgotten: int, learned: int) -> float:
    """Exact two-sided McNemar p-value of b = `forgotten` and c = `learned` discordant pairs:
    min(1, 2 sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c)); 1.0 without discordant pairs."""
    try:
        b, c = operator.index(forgotten), operator.index(learned)  # numpy counts too, never floats
    except TypeError:
        b = c = -1
    if min(b, c) < 0:
        raise SftlensError(f"mcnemar: discordant counts must be non-negative integers, got {forgotten!r} and {learned!r}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail, term = 0, 1  # term = C(n, i), exact in integers
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2 ** n)  # int / int: correctly rounded, whatever n
