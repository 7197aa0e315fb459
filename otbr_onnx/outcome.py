"""One model's result in batch mode (``Outcome``): what ``batch`` records and every executor
returns, in a module of its own so that ``batch`` and ``executors`` each import it and not each
other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """One model's result. ``status``: clean: cleaned, skipped (done before), refused, failed;
    scan: passed (nothing found), suspected, skipped, refused, failed. The facts after ``seconds``
    come from the model's report (None when there is none: refused, failed)."""

    model: str
    status: str
    exit_code: int
    message: str = ""
    output: str | None = None
    seconds: float = 0.0  # wall time of this run's task (a skipped model: the check alone)
    verdict: str | None = None  # the scan's: "suspected", "none found", "not scanned" (--reference)
    targets: tuple[int, ...] = ()  # suspected target classes
    strength: float | None = None  # the candidate a changed model was cleaned at (pruning: the prune ratio)
    fidelity: float | None = None  # that candidate's fidelity score, %
    # "soft agreement" (probes, no data), "accuracy" (--calibration, --data) or "held-out agreement"
    fidelity_metric: str | None = None
