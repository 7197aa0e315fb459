"""The adversarial remover as a ``removers.base.Remover``: unlearn the triggers found on the
user's images (``removers/adversarial.py``), then rescan. The same rule as the pruning
remover's: a target the rescan still flags is not removed, and such a model is refused.

The strength of this remover is the unlearning round kept; its fidelity the held-out agreement
with the original's answers in that round (the round was chosen by the accuracy those changed
answers are expected to cost, ``adversarial.expected_accuracy_drop``, which the report shows per
round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from otbr_onnx.detect import ScanResult, rescan_prepared
from otbr_onnx.errors import FidelityBudgetError
from otbr_onnx.removers import adversarial
from otbr_onnx.removers.base import Progress

if TYPE_CHECKING:
    from otbr_onnx.data import Images
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel
    from otbr_onnx.timing import Timer


@dataclass(frozen=True)
class AdversarialRemover:
    name: str = "adversarial"

    def remove(self, prepared: "PreparedModel", detection: ScanResult | None, images: "Images | None",
               options: "CleanOptions", progress: Progress | None, timer: "Timer") -> "UnlearningRemoval":
        targets = list(detection.suspected) if detection is not None else []
        with timer.stage("unlearning"):
            # the families the inversion flagged the targets with are the ones unlearnt
            evidence = detection.inversion.evidence if detection is not None and detection.inversion else None
            removal = adversarial.remove(prepared, images.x, targets, options, progress, evidence=evidence)
        with timer.stage("rescan"):
            rescan = None if detection is None else rescan_prepared(
                prepared, prepared.with_weights(removal.weights), detection, options)
        _refuse_flagged(targets, rescan)
        return UnlearningRemoval(removal, rescan)


@dataclass
class UnlearningRemoval:
    """What adversarial unlearning changed (``adversarial.Removal``) and the rescan."""

    removal: adversarial.Removal
    rescan: ScanResult | None

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.removal.weights

    @property
    def strength(self) -> float | None:
        return self.removal.log.chosen

    @property
    def fidelity(self) -> tuple[float, str] | None:
        return self.removal.log.kept.agreement, "held-out agreement"

    @property
    def pruned(self) -> dict[str, int]:
        return {}

    def verdict(self, detection: ScanResult | None, options: "CleanOptions") -> str:
        log = self.removal.log
        targets = log.targets
        before = f" from {log.original.worst_reach:.0f}%" if log.original is not None else ""
        verdict = (f"backdoor suspected (class {', '.join(map(str, targets))}): triggers found on the user's images "
                   f"unlearnt (held-out reach of the worst trigger family {log.kept.worst_reach:.0f}%{before})"
                   if targets else "no class suspected: cleaned anyway (--always), untargeted unlearning")
        return verdict  # what a scan of the model handed back flags is the pipeline's final scan to say

    def as_dict(self) -> dict:
        return {"removal": self.removal.as_dict()}


def _refuse_flagged(targets: list[int], rescan: ScanResult | None) -> None:
    """The same rule as the pruning path's: a target the rescan still flags is not removed."""
    still = [t for t in targets if rescan is not None and not rescan.cleared(t)]
    if still:
        raise FidelityBudgetError(
            f"after adversarial unlearning the rescan still flags class {still[0]} "
            f"({rescan.holding(still[0])}); refusing to hand back a model that is not cleaned")


REMOVER = AdversarialRemover()
