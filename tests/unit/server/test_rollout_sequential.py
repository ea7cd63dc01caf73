"""The rollout's sequential accuracy decision: examples on constructed outcome sequences (better,
equal, worse, too little data), and its stated error rates checked by simulating 10,000 rollouts
per scenario through the real ``decide``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.rollouts.sequential import PairedCounts, Rule, decide, judge_look, lower_accuracy_bound

RULE = Rule()
ROLLOUTS = 10_000


def _windows(*triples: tuple[int, int, int]) -> list[PairedCounts]:
    return [PairedCounts(*t) for t in triples]


def test_a_clearly_better_candidate_passes_at_the_first_look():
    verdict = decide(_windows((20, 14, 0)), RULE)
    assert (verdict.decision, verdict.test, verdict.look) == ("pass", "superiority", 1)
    assert verdict.p_value == pytest.approx(0.5 ** 14)
    assert "exact McNemar" in verdict.describe()


def test_a_clearly_worse_candidate_fails_but_only_once_significant():
    assert decide(_windows((20, 0, 5)), RULE).decision == "wait"  # p = 1/32: not at 0.05 / 8
    verdict = decide(_windows((20, 0, 5), (20, 0, 4)), RULE)
    assert (verdict.decision, verdict.test, verdict.look) == ("fail", "inferiority", 2)
    assert verdict.p_value <= RULE.beta / RULE.looks


def test_an_equal_candidate_waits_then_passes_by_non_inferiority():
    # 1 in 80 frames goes either way: the bound on the loss (exact, so conservative) needs 320 frames.
    assert decide(_windows(*[(40, 1, 0), (40, 0, 1)] * 2), RULE).decision == "wait"
    verdict = decide(_windows(*[(40, 1, 0), (40, 0, 1)] * 4), RULE)
    assert (verdict.decision, verdict.test) == ("pass", "non-inferiority")
    assert verdict.upper_bound < RULE.margin


def test_too_little_data_decides_nothing_and_reports_what_it_has():
    verdict = decide(_windows((5, 3, 0), (6, 2, 0)), RULE)  # 11 known frames: before the first look
    assert verdict.decision == "wait" and verdict.look == 0
    assert verdict.counts == PairedCounts(11, 5, 0)
    assert decide([], RULE).decision == "wait"


def test_looks_happen_at_milestones_so_re_evaluating_does_not_spend_more_error():
    # The same counts judged after every window or once: the same decision, at the same look.
    many = decide(_windows(*[(4, 0, 1)] * 20), RULE)
    once = decide(_windows((80, 0, 20)), RULE)
    assert (many.decision, many.counts) == ("fail", PairedCounts(40, 0, 10))  # decided at look 2 (40 known)
    assert once.decision == "fail" and once.look == 1  # 80 known frames at once: judged at the first look
    assert judge_look(PairedCounts(40, 0, 10), RULE, 2).decision == "fail"


def test_after_the_last_look_nothing_more_is_decided():
    short = Rule(first_look=20, looks=2)
    verdict = decide(_windows((40, 2, 2), (400, 20, 20)), short)
    assert verdict.decision == "wait" and verdict.look == 2


def test_inconsistent_counts_are_refused():
    with pytest.raises(ValueError):
        PairedCounts(5, 4, 3)
    with pytest.raises(ValueError):
        PairedCounts(5, -1, 0)


def test_the_active_models_accuracy_bound_is_exact_and_one_sided():
    assert lower_accuracy_bound(100, 100) == pytest.approx(0.05 ** (1 / 100))
    assert lower_accuracy_bound(4, 30) < 4 / 30
    assert lower_accuracy_bound(0, 0) == 0.0


# ---------------------------------------------------------------- error rates by simulation


def _simulate(p_candidate_only: float, p_active_only: float, rule: Rule = RULE, seed: int = 0) -> dict[str, float]:
    """ROLLOUTS rollouts whose known frames arrive in windows that end at the rule's looks; each
    frame independently candidate-only right, active-only right or a tie."""
    rng = np.random.default_rng(seed)
    milestones = rule.milestones()
    sizes = np.diff([0, *milestones])
    p_tie = 1.0 - p_candidate_only - p_active_only
    draws = np.stack([rng.multinomial(n, [p_candidate_only, p_active_only, p_tie], size=ROLLOUTS) for n in sizes],
                     axis=1)  # (rollouts, looks, 3)
    outcomes = {"pass": 0, "fail": 0, "wait": 0}
    known_at_pass = []
    for rollout in range(ROLLOUTS):
        windows = [PairedCounts(int(n), int(b), int(c)) for n, (b, c, _) in zip(sizes, draws[rollout], strict=True)]
        verdict = decide(windows, rule)
        outcomes[verdict.decision] += 1
        if verdict.decision == "pass":
            known_at_pass.append(verdict.counts.known)
    rates = {k: v / ROLLOUTS for k, v in outcomes.items()}
    rates["median_known_at_pass"] = float(np.median(known_at_pass)) if known_at_pass else math.inf
    return rates


def _at_most(rate: float, bound: float) -> bool:
    # The observed rate of ROLLOUTS trials, allowing 3 standard errors of sampling noise.
    return rate <= bound + 3 * math.sqrt(bound * (1 - bound) / ROLLOUTS)


@pytest.mark.parametrize(("p_b", "p_c"), [(0.0, RULE.margin), (0.05, 0.05 + RULE.margin), (0.2, 0.2 + RULE.margin)])
def test_a_candidate_worse_by_the_margin_is_promoted_at_most_alpha_of_the_time(p_b, p_c):
    rates = _simulate(p_b, p_c)
    print(f"worse by the margin ({p_b}, {p_c}): {rates}")
    assert _at_most(rates["pass"], RULE.alpha)


@pytest.mark.parametrize(("p_b", "p_c"), [(0.1, 0.1), (0.3, 0.3)])
def test_an_equal_candidate_is_failed_at_most_beta_of_the_time_and_usually_passes(p_b, p_c):
    rates = _simulate(p_b, p_c, seed=1)
    print(f"equal ({p_b}, {p_c}): {rates}")
    assert _at_most(rates["fail"], RULE.beta)


def test_an_identical_candidate_always_passes_and_a_much_better_one_passes_early():
    assert _simulate(0.0, 0.0, seed=2)["pass"] == 1.0
    rates = _simulate(0.3, 0.02, seed=3)  # right on 30 % of frames the active model gets wrong
    print(f"much better: {rates}")
    assert rates["pass"] >= 0.999 and rates["fail"] == 0.0
    assert rates["median_known_at_pass"] <= 40  # usually at the first or second look
