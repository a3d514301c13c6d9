"""The dev-choice rule the study and the audit share: among candidates scored on dev, the best mean
score wins; among equal means, the first in a tie order. The study's units (`sftlens.study.engine.choice`:
restore ratio, repair value, learning rate, guard value, each a mean over seeds) and the audit's repair
choice (`sftlens.audit.repairs.choose`: one score per value) both pick with `best_mean`; `least_edit` is
the tie order of a knob with a neutral value (repairs, guards): the value nearest it, then the smaller.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence


def best_mean(scores: Mapping[Hashable, Sequence[float]], tie_order: Callable) -> Hashable:
    """The candidate with the best mean score; among equals, the first in `tie_order` (a sort key)."""
    return max(sorted(scores, key=tie_order), key=lambda candidate: statistics.fmean(scores[candidate]))


def least_edit(neutral: float) -> Callable[[float], tuple[float, float]]:
    """The tie order of a knob's values: nearest the neutral value (the least edit) first, then the smaller."""
    return lambda value: (abs(value - neutral), value)
