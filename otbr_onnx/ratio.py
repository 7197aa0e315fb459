"""Choosing the pruning ratio gamma under a fidelity budget.

The paper picks gamma per model by sweeping it on test data; a data-free tool cannot. Measured
on the benchmark (benchmarks/RESULTS.md), no single gamma fits every model: gamma 0.01 costs one
model 1.2 accuracy points and another 36.8; at 0.02 the cost ranges from 5.4 to 54.9. So gamma is
chosen per model as the LARGEST candidate whose cleaned model still answers like the original on
a reference set, scanning upwards and stopping at the first candidate over budget (damage grows
with gamma, and a scan that stops early fuses fewer candidates). The reference set is either

- synthesised probes (``probes.py``, no data; the default), labelled with the original model's
  own answers; the score is soft agreement, the cleaned model's mean probability for those
  answers as % of the original's, and the budget is how much of it may be lost
  (``max_disagreement``); or
- the user's clean images (``--calibration``), scored by accuracy, with ``max_acc_drop``.

If even the smallest candidate breaks the budget, no ratio is chosen and ``clean`` refuses
(exit 3): a model whose answers change that much is worse than a refusal, and an unchanged
model must not pass as a cleaned one. ``--prune-ratio`` still forces a ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable

CANDIDATE_RATIOS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2)


def distinct_candidates(ratios: tuple[float, ...], ranked_neurons: int) -> list[float]:
    """The ratios that prune a different, non-zero number of neurons (``floor(ratio * N)``),
    smallest first, keeping the largest ratio of each count: on a model with 150 ranked neurons
    0.005 prunes nothing and would pass any budget without cleaning anything."""
    by_count: dict[int, float] = {}
    for ratio in sorted(ratios):
        count = math.floor(ratio * ranked_neurons)
        if count > 0:
            by_count[count] = ratio
    return [by_count[count] for count in sorted(by_count)]


def choose_ratio(candidates: list[float], score_at: Callable[[float], float], baseline: float,
                 budget: float) -> dict:
    """Scan ``candidates`` upwards; keep the last whose score stays within ``budget`` points of
    ``baseline``. Returns the trials run and the chosen ratio (None: the first is over budget)."""
    if not candidates:
        raise ValueError("no candidate ratio prunes any neuron")
    trials: list[dict] = []
    chosen = None
    for ratio in candidates:
        score = score_at(ratio)
        trials.append({"ratio": ratio, "score": score})
        if baseline - score > budget:
            break
        chosen = ratio
    return {"trials": trials, "chosen_ratio": chosen}
