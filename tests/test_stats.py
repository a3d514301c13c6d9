"""The exact McNemar test against a brute-force enumeration of binomial outcomes."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from sftlens.errors import SftlensError
from sftlens.reporting.stats import mcnemar


def as_likely_or_less(b: int, c: int) -> Fraction:
    """The exact p-value by its definition: every split k of the b + c discordant pairs under
    Binomial(b + c, 1/2), summing the probabilities of those at most as likely as the observed one."""
    n = b + c
    p = [Fraction(comb(n, k), 2 ** n) for k in range(n + 1)]
    return sum((q for q in p if q <= p[b]), Fraction(0))


def doubled_tail(b: int, c: int) -> Fraction:
    n = b + c
    return min(Fraction(1), 2 * sum((Fraction(comb(n, k), 2 ** n) for k in range(min(b, c) + 1)), Fraction(0)))


@pytest.mark.parametrize("b", range(31))
def test_mcnemar_equals_both_definitions_on_a_grid(b):
    for c in range(31):
        p = mcnemar(b, c)
        assert p == float(doubled_tail(b, c)) == float(as_likely_or_less(b, c)), (b, c)
        assert p == mcnemar(c, b)  # two-sided: which model is "forgotten" does not matter


def test_mcnemar_known_values_and_bad_input():
    assert mcnemar(0, 0) == 1.0  # no discordant facts: no evidence of a difference
    assert mcnemar(0, 5) == 2 / 32
    assert mcnemar(1, 9) == 2 * 11 / 1024
    assert mcnemar(5, 5) == 1.0
    assert mcnemar(np.int64(0), np.int64(5)) == 2 / 32  # counts summed by numpy
    assert 0 < mcnemar(400, 600) < 1e-9  # large counts stay exact and finite
    for bad in ((-1, 2), (1.5, 2), (2, None)):
        with pytest.raises(SftlensError, match="non-negative integers"):
            mcnemar(*bad)
