"""The outlier statistic both detectors use: a leave-one-out robust z-score."""

from __future__ import annotations

import numpy as np
from scipy.stats import median_abs_deviation

MAD_TO_SIGMA = 1.4826


def robust_z(statistics: np.ndarray, min_spread: float, magnitude: bool = False) -> np.ndarray:
    """Each entry's z against the OTHER entries: ``(v_c - median) / spread``, with spread =
    1.4826 MAD of the others, floored at ``min_spread`` times the typical size of the others
    (``|median|``, or with ``magnitude`` the median of their absolute values), and at least
    ``min_spread``: values that happen to coincide must not turn a small difference into a large
    z. Leaving the entry out keeps a real outlier from hiding in its own reference."""
    values = np.asarray(statistics, dtype=np.float64)
    z = np.zeros_like(values)
    for c in range(len(values)):
        others = np.delete(values, c)
        if others.size == 0:
            continue
        median = np.median(others)
        # scale 1.0 times 1.4826, not scale="normal" (1 / ndtri(0.75) = 1.482602...): the same
        # bits as the published constant, so every z (and verdict) stays as it was
        spread = MAD_TO_SIGMA * median_abs_deviation(others)
        typical = np.median(np.abs(others)) if magnitude else abs(median)
        spread = max(spread, min_spread * max(typical, 1.0))
        z[c] = (values[c] - median) / spread
    return z
