"""The shadow phase's accuracy decision: pass, fail or keep collecting, on paired outcomes.

Both models see the same frames; on a frame whose truth is known (a QA label with the frame, or an
HMI correction that arrived later) each is right or wrong. Frames where both are right, or both
wrong, say nothing about which is better; the *discordant* ones decide: ``b`` frames only the
candidate got right, ``c`` frames only the active model got right, out of ``n`` known frames.

The rule is a group-sequential design with a fixed number of looks, so its error rates hold however
often the controller re-evaluates: a look happens when the known frames first reach
``first_look * 2**k`` (k = 0 .. looks-1), and every look spends an equal share of each error rate
(Bonferroni, so the stated rates are upper bounds whatever the looks' correlation). At a look:

- **pass, superiority**: exact one-sided McNemar test (binomial on the discordant pairs, H0: the
  candidate wins at most half of them), p <= alpha / (2 * looks);
- **pass, non-inferiority**: an exact upper confidence bound on ``c/n - b/n`` (Clopper-Pearson upper
  bound of c/n minus lower bound of b/n, each at alpha / (4 * looks)) below ``margin``. This is
  what passes a candidate that is as good as the active model (few or no discordant frames);
- **fail**: exact one-sided McNemar test the other way (H0: the active model wins at most half),
  p <= beta / looks: the candidate is significantly worse;
- otherwise: keep collecting. After the last look nothing more is decided; the wave's time limit
  turns that into "not enough evidence".

Error rates (checked by simulation in tests/unit/server/test_rollout_sequential.py):
- a candidate whose accuracy is ``margin`` or more below the active model's passes with
  probability <= ``alpha``;
- a candidate at least as accurate as the active model fails with probability <= ``beta``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from scipy.stats import binomtest

Decision = Literal["pass", "fail", "wait"]


@dataclass(frozen=True)
class PairedCounts:
    """Paired outcomes on known-truth frames (cumulative or one window's)."""

    known: int = 0  # frames whose truth is known and both models ran on
    candidate_only: int = 0  # b: the candidate right, the active model wrong
    active_only: int = 0  # c: the active model right, the candidate wrong

    def __add__(self, other: PairedCounts) -> PairedCounts:
        return PairedCounts(self.known + other.known, self.candidate_only + other.candidate_only,
                            self.active_only + other.active_only)

    def __post_init__(self) -> None:
        if min(self.known, self.candidate_only, self.active_only) < 0 or (
                self.candidate_only + self.active_only > self.known):
            raise ValueError(f"inconsistent paired counts: {self}")


@dataclass(frozen=True)
class Rule:
    alpha: float = 0.05  # wrong promotion: passing a candidate worse by `margin` or more
    beta: float = 0.05  # wrong failure: failing a candidate that is not worse
    margin: float = 0.05  # non-inferiority margin, in accuracy on known frames
    first_look: int = 20  # known frames at the first look
    looks: int = 8  # looks at first_look, 2x, 4x, ... (8: up to 2,560 known frames)

    def milestones(self) -> list[int]:
        return [self.first_look * 2 ** k for k in range(self.looks)]


@dataclass(frozen=True)
class Evidence:
    """What decided (or why nothing did yet), for the gate's value and the dashboard."""

    decision: Decision
    test: str  # "superiority", "non-inferiority", "inferiority" or "" (no decision)
    counts: PairedCounts  # at the deciding look (or all collected so far when waiting)
    look: int  # 1-based index of the deciding look; looks taken so far when waiting
    p_value: float | None = None  # the deciding (or, waiting, the last look's superiority) p
    level: float | None = None  # the per-look level it was compared with
    upper_bound: float | None = None  # non-inferiority: the bound on the accuracy loss

    def describe(self) -> str:
        n, b, c = self.counts.known, self.counts.candidate_only, self.counts.active_only
        base = f"{n} known frames, candidate-only right {b}, active-only right {c}"
        if self.decision == "wait":
            return f"{base}; no decision after {self.look} look(s)"
        if self.test == "non-inferiority":
            return (f"{base}; non-inferior at look {self.look}: accuracy loss <= {self.upper_bound:.3f} "
                    f"(bound at level {self.level:.2g})")
        return f"{base}; {self.test} at look {self.look}: exact McNemar p={self.p_value:.2g} <= {self.level:.2g}"

    def as_dict(self) -> dict:
        return {"decision": self.decision, "test": self.test, "known": self.counts.known,
                "candidate_only": self.counts.candidate_only, "active_only": self.counts.active_only,
                "look": self.look, "p_value": self.p_value, "level": self.level, "upper_bound": self.upper_bound}


@lru_cache(maxsize=65536)
def _greater(k: int, n: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2): the exact one-sided McNemar p-value."""
    return float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else 1.0


@lru_cache(maxsize=65536)
def _bounds(k: int, n: int, level: float) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) lower and upper bounds of k/n, each at error ``level``."""
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * level, method="exact")
    return float(ci.low), float(ci.high)


def judge_look(counts: PairedCounts, rule: Rule, look: int) -> Evidence:
    """The decision at one look (pure; the caller chooses when a look happens)."""
    n, b, c = counts.known, counts.candidate_only, counts.active_only
    superiority_level = rule.alpha / (2 * rule.looks)
    p_sup = _greater(b, b + c)
    if b + c and p_sup <= superiority_level:
        return Evidence("pass", "superiority", counts, look, p_sup, superiority_level)
    fail_level = rule.beta / rule.looks
    p_inf = _greater(c, b + c)
    if b + c and p_inf <= fail_level:
        return Evidence("fail", "inferiority", counts, look, p_inf, fail_level)
    ni_level = rule.alpha / (4 * rule.looks)
    if n:
        upper_loss = _bounds(c, n, ni_level)[1] - _bounds(b, n, ni_level)[0]
        if upper_loss < rule.margin:
            return Evidence("pass", "non-inferiority", counts, look, None, ni_level, upper_loss)
    return _waiting(counts, rule, look)


def _waiting(counts: PairedCounts, rule: Rule, look: int) -> Evidence:
    """No decision yet: the superiority p-value so far, for the dashboard."""
    discordant = counts.candidate_only + counts.active_only
    return Evidence("wait", "", counts, look, _greater(counts.candidate_only, discordant) if discordant else None,
                    rule.alpha / (2 * rule.looks))


def decide(windows: Iterable[PairedCounts], rule: Rule) -> Evidence:
    """Walk the windows in the order they were reported; look when the known frames first reach each
    milestone (several milestones reached at once are several looks at the same counts)."""
    milestones = rule.milestones()
    total = PairedCounts()
    looked = 0
    for window in windows:
        total = total + window
        while looked < len(milestones) and total.known >= milestones[looked]:
            looked += 1
            verdict = judge_look(total, rule, looked)
            if verdict.decision != "wait":
                return verdict
    return _waiting(total, rule, looked)


@lru_cache(maxsize=4096)
def lower_accuracy_bound(correct: int, known: int, level: float = 0.05) -> float:
    """One-sided exact lower bound of an accuracy (e.g. whether the active model is trustworthy)."""
    return _bounds(correct, known, level)[0] if known else 0.0
