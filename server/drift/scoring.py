"""Drift scores of one window's histogram against the reference's (pure; no I/O).

Three standard statistics per metric, all from SciPy on the binned data:

* ``psi`` -- population stability index, the symmetrised Kullback-Leibler divergence
  ``KL(w||r) + KL(r||w)`` (``scipy.stats.entropy``) of the two binned distributions, with
  Jeffreys smoothing (see ``psi``) so an empty bin does not make it infinite. The usual
  reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a significant shift.
* ``ks`` -- the two-sample Kolmogorov-Smirnov statistic (``scipy.stats.ks_2samp``) on the
  histograms expanded to bin-centre samples: the largest gap between the two CDFs, 0..1.
* ``wasserstein`` -- earth mover's distance (``scipy.stats.wasserstein_distance`` with the
  counts as weights), divided by the metric's range so it reads as a share of that range.

Means of a histogram (mean confidence, detections per frame) come from the same bin centres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

STATISTICS = ("psi", "ks", "wasserstein")
SMOOTHING = 0.5


@dataclass(frozen=True)
class MetricScore:
    psi: float
    ks: float
    wasserstein: float
    count: int  # values in the window's histogram

    def value(self, statistic: str) -> float:
        return float(getattr(self, statistic))

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def centres(edges: Sequence[float]) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    return (e[:-1] + e[1:]) / 2


def mean_of(edges: Sequence[float], counts: Sequence[int]) -> float | None:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return float((centres(edges) * c).sum() / total) if total > 0 else None


def psi(window: Sequence[int], reference: Sequence[int]) -> float:
    w = np.asarray(window, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    k = w.shape[0]
    # Jeffreys smoothing of the window (half a count per bin), and the same share of uniform mass
    # mixed into the reference: smoothing each side by its own counts would make bins empty on
    # both sides differ by sample size alone (a 100-frame window scored ~0.2 against a 1,000-frame
    # reference on an unchanged line).
    mix = k * SMOOTHING / (w.sum() + k * SMOOTHING)
    p = (1 - mix) * w / w.sum() + mix / k
    q = (1 - mix) * r / r.sum() + mix / k
    # PSI = sum((p - q) * ln(p / q)) = KL(p||q) + KL(q||p).
    return float(stats.entropy(p, q) + stats.entropy(q, p))


def score(edges: Sequence[float], window: Sequence[int], reference: Sequence[int]) -> MetricScore:
    """All three statistics of ``window`` against ``reference`` (same edges; both non-empty)."""
    w = np.asarray(window, dtype=np.int64)
    r = np.asarray(reference, dtype=np.int64)
    if w.shape != r.shape or w.shape[0] != len(edges) - 1:
        raise ValueError(f"histograms of {w.shape[0]} and {r.shape[0]} bins for {len(edges) - 1} bins of edges")
    if w.sum() <= 0 or r.sum() <= 0:
        raise ValueError("both histograms need at least one value")
    mid = centres(edges)
    span = float(edges[-1] - edges[0]) or 1.0
    ks = stats.ks_2samp(np.repeat(mid, w), np.repeat(mid, r), method="asymp").statistic
    wd = stats.wasserstein_distance(mid, mid, u_weights=w, v_weights=r) / span
    return MetricScore(psi=psi(w, r), ks=float(ks), wasserstein=float(wd), count=int(w.sum()))
