"""Which repair brings the forgotten facts back: candidate values, dev/test slices, the objective
that picks a value on dev, and the scores of the picked value on the held-out test facts.

Every method of `sftlens.weights.METHODS` gets the same number of candidates (one tuning budget).
A value is chosen by one objective over the dev facts, ties going to the least edit (the value
nearest the method's neutral one); it is then scored on test facts it never saw, paired with the
fine-tuned model on the same facts.
"""

from __future__ import annotations

import numpy as np

from sftlens.audit.transitions import ratio_estimate
from sftlens.errors import SftlensError
from sftlens.evaluate import acc_levels, acc_of, summarize
from sftlens.io import stable_hash
from sftlens.reporting.bootstrap import FactDraws, SeedDraws, arm_difference
from sftlens.reporting.choice import best_mean, least_edit
from sftlens.reporting.stats import mcnemar
from sftlens.weights import METHODS, parse_values

# Ladders of sensible values, least edit first; a budget of k takes k of them evenly spread (spectral's
# middle value, taken by a budget of 1 or 3, is the Gavish-Donoho threshold itself).
LADDERS = {"restore": (1, 3, 5, 10, 20, 40), "wise": (0.9, 0.75, 0.6, 0.5, 0.4, 0.25),
           "dare": (0.1, 0.3, 0.5, 0.6, 0.75, 0.9), "trim": (80, 50, 30, 20, 10, 5),
           "spectral": (0.5, 0.75, 1, 1.5, 2, 3),
           # restore's ratios: the guided repair differs from restore's top-k only in what it ranks by
           "guided": (1, 3, 5, 10, 20, 40)}
OBJECTIVES = {"recovered": "forgotten facts recovered minus learned facts lost (share of dev facts)",
              "acc": "the paper's Acc on the dev facts (mean over base levels, averaged over domains)"}


def candidates(method: str, budget: int, given=None) -> tuple[float, ...]:
    """The `budget` candidate values of `method` (`given`: the user's, which must be that many)."""
    if given:
        values = parse_values(method, given)
        if len(values) != budget:
            raise SftlensError(f"--values {method}: {len(values)} distinct values, but every method gets "
                               f"{budget} candidates (--candidates)")
        return values
    ladder = LADDERS.get(method, ())
    if budget > len(ladder):
        raise SftlensError(f"{method} has {len(ladder)} default candidates; give --values {method}=... "
                           f"for a budget of {budget}")
    picks = [ladder[(len(ladder) - 1) // 2]] if budget == 1 else \
        [ladder[round(i * (len(ladder) - 1) / (budget - 1))] for i in range(budget)]
    return parse_values(method, picks)


def slices(facts, dev_share: float, seed: int, min_slice: int) -> dict[str, str]:
    """fact id -> "dev" or "test": per domain, the facts in a seeded hash order, the first
    round(share n) to dev. Too few facts on either side is an error."""
    by_domain: dict[str, list[str]] = {}
    for fact in facts:
        by_domain.setdefault(fact.domain, []).append(fact.id)
    out = {}
    for ids in by_domain.values():
        ordered = sorted(ids, key=lambda i: stable_hash([seed, i]))
        cut = round(dev_share * len(ordered))
        out.update({i: "dev" if k < cut else "test" for k, i in enumerate(ordered)})
    dev = sum(v == "dev" for v in out.values())
    test = len(out) - dev
    if min(dev, test) < min_slice:
        raise SftlensError(f"too few facts: {len(out)} facts give a dev slice of {dev} and a test slice of {test}, "
                           f"each needs at least {min_slice} (more facts with --limit, or --dev-share, --min-slice)")
    return out


def objective_facts(rows: list[dict], name: str) -> list[dict]:
    """The rows `objective` reads, so the only ones a candidate is answered on: every one for Acc;
    for recovered those whose greedy correctness differs between the two models (a fact both answer
    right, or both wrong, can be neither recovered nor lost). The objective still divides by all rows."""
    return rows if name == "acc" else [r for r in rows if r["base_correct"] != r["finetuned_correct"]]


def objective(rows: list[dict], repaired: dict[str, bool], name: str) -> float:
    """The objective of a repaired model whose answers are right where `repaired` says; `repaired`
    needs only the facts of `objective_facts`, `rows` are all the slice's facts."""
    if name == "recovered":
        recovered = sum(r["base_correct"] and not r["finetuned_correct"] and repaired[r["fact_id"]] for r in rows)
        lost = sum(r["finetuned_correct"] and not r["base_correct"] and not repaired[r["fact_id"]] for r in rows)
        return (recovered - lost) / len(rows)
    records = summarize([{"domain": r["domain"], "level": r["base_level"], "correct": repaired[r["fact_id"]]}
                         for r in rows])
    domains = sorted({r["domain"] for r in rows})
    return sum(acc_of(records, d) for d in domains) / len(domains)


def choose(scores: dict[float, float], method: str) -> float:
    """The value with the best score; ties: the least edit (nearest the neutral value), then the smaller."""
    return best_mean({v: [s] for v, s in scores.items()}, least_edit(METHODS[method].neutral))


def bits(rows: list[dict], correct) -> dict[str, dict[str, str]]:
    """Correctness as the bootstrap's bit strings: domain -> base level -> "0110..." (rows' order)."""
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        level = out.setdefault(row["domain"], {})
        level[str(row["base_level"])] = level.get(str(row["base_level"]), "") + "01"[bool(correct(row))]
    return out


def acc_gain(rows: list[dict], repaired: dict[str, bool], samples: int, seed: int) -> dict:
    """Per domain: the repaired model's Acc and its gain over the fine-tune, paired over the facts."""
    out = {}
    for domain in sorted({r["domain"] for r in rows}):
        part = [r for r in rows if r["domain"] == domain]
        records = summarize([{"domain": domain, "level": r["base_level"], "correct": r["finetuned_correct"]}
                             for r in part])
        levels = acc_levels(records, domain)
        after = bits(part, lambda r: repaired[r["fact_id"]])
        before = bits(part, lambda r: r["finetuned_correct"])
        gain = arm_difference(FactDraws(samples, seed), SeedDraws(samples, seed), [{"bits": after}],
                              [{"bits": before}], domain, levels, paired_seeds=True)
        out[domain] = {"acc": FactDraws(1, seed).acc(after, domain, levels)[0], "gain": gain, "levels": levels}
    return out


def held_out_scores(rows: list[dict], repaired: dict[str, bool], samples: int, seed: int) -> dict:
    """Recovered (forgotten facts answered right again), learned kept, Acc per domain on test, and the
    exact McNemar p-value of the repaired model against the fine-tune."""
    got = np.array([repaired[r["fact_id"]] for r in rows], dtype=bool)
    base = np.array([r["base_correct"] for r in rows], dtype=bool)
    tuned = np.array([r["finetuned_correct"] for r in rows], dtype=bool)
    return {"recovered": ratio_estimate(got & base & ~tuned, base & ~tuned, samples, seed),
            "learned_kept": ratio_estimate(got & ~base & tuned, ~base & tuned, samples, seed),
            "forgotten_n": int((base & ~tuned).sum()), "learned_n": int((~base & tuned).sum()),
            "acc": acc_gain(rows, repaired, samples, seed),
            # The repair against the fine-tune on the same facts: lost (right -> wrong) against gained.
            "mcnemar_p": mcnemar(int((tuned & ~got).sum()), int((~tuned & got).sum()))}
