"""What relearning left: the relearnt model searched again, and a class that search still flags
unlearnt with the adversarial remover's machinery (issue 33, item 2).

Relearning never sees the trigger, so a global trigger whose target the original also answers
on many ordinary (augmented) images can leak back through the teacher. Two searches of the
relearnt model were measured (benchmarks/RESIDUAL_DEV.md, RESIDUAL.md): the scan the pipeline's
final check runs (``detect.scan_handed_back``) and the minimal-trigger statistic
(``detectors/minimal.py``). On the held-out split neither changed the picture: the scan flagged
one of 22 relearnt models (its true target; ASR 12.2 -> 10.0), the minimal search flagged class 8
on three (none a target) and never the image-Blended PreAct whose backdoor survives relearning.
So the step is off by default (``--unlearn-residual off``) and kept as an option.

Where the search flags a class, ``adversarial.remove`` unlearns the triggers it
finds for that class on the relearnt model, keeping the relearnt model's answers, within what the
accuracy budget has left after relearning. The result is kept only when, measured against the
ORIGINAL's answers on relearning's held-out quarter (the adversarial remover holds out the same
images: both split with ``seed + 1``), the whole cleaning stays within ``--max-acc-drop``;
otherwise the relearnt model is handed back and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from otbr_onnx.detect import ScanResult, detect, scan_handed_back
from otbr_onnx.errors import FidelityBudgetError
from otbr_onnx.removers import adversarial
from otbr_onnx.removers.base import Progress

if TYPE_CHECKING:
    from otbr_onnx.detectors.minimal import MinimalResult
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel

# Below this many points of budget left after relearning, unlearning is not tried: its rounds
# would all be refused.
MIN_BUDGET = 0.5


@dataclass
class Residual:
    """The relearnt model's scan and what unlearning its flagged classes did."""

    scan: "ScanResult | MinimalResult | None"  # the relearnt model's scan or minimal-trigger search (None: not run)
    weights: dict[str, np.ndarray]  # what is handed back: every tensor that differs from the original
    detector: str = "scan"  # what searched the relearnt model: "scan" or "minimal"
    unlearning: adversarial.Removal | None = None  # None: not run, or its result not kept
    skipped: str | None = None  # why unlearning did not run or was not kept
    expected_drop: float | None = None  # the handed-back model vs the original, held-out quarter
    agreement: float | None = None

    @property
    def targets(self) -> list[int]:
        return [] if self.scan is None else list(self.scan.suspected)

    @property
    def searched_by(self) -> str:
        return "minimal-trigger search" if self.detector == "minimal" else "scan"

    @property
    def unlearnt(self) -> bool:
        return self.unlearning is not None

    def as_dict(self) -> dict:
        return {"detector": self.detector, "rescan_after_relearning": self.targets, "unlearnt": self.unlearnt,
                "skipped": self.skipped,
                "expected_accuracy_drop": None if self.expected_drop is None else round(self.expected_drop, 2),
                "holdout_agreement": None if self.agreement is None else round(self.agreement, 2),
                "unlearning": self.unlearning.as_dict() if self.unlearning is not None else None}


def unlearn_residual(prepared: "PreparedModel", relearnt: dict[str, np.ndarray], spent: float,
                     images: np.ndarray, detection: ScanResult | None, options: "CleanOptions",
                     progress: Progress | None = None, detector: str = "scan") -> Residual:
    """Scan the model ``relearnt`` makes (weights in ONNX layout, all differences from the
    original); unlearn what it flags within ``options.max_acc_drop - spent`` (``spent``: the
    accuracy relearning is expected to have cost). Never raises a budget refusal: a refused
    unlearning leaves the relearnt weights, with the reason in ``skipped``. ``detection``: the
    original's scan, whose settings the rescan repeats (None: a fresh ``detect`` with ``options``).
    ``detector``: "minimal" (``detectors/minimal.py``, the minimal-trigger statistic) or "scan"
    (the pipeline's scan)."""
    module = prepared.with_weights(relearnt)
    base = replace(prepared, module=module)  # the relearnt model is the reference; ``original`` stays the input's
    if detector == "minimal":
        from otbr_onnx.detectors.minimal import DETECTOR
        scan = DETECTOR.run(base, options, images, progress)
        if scan is None:  # too many classes, or images that are not (N, C, H, W): the search cannot run
            return Residual(None, relearnt, detector,
                            skipped="the minimal-trigger search cannot run on this model")
    else:
        scan = (scan_handed_back(prepared, module, detection, options) if detection is not None
                else detect(base, options, progress, images))
    residual = Residual(scan, relearnt, detector)
    if not scan.suspected:
        residual.skipped = f"the relearnt model's {residual.searched_by} flags no class"
        return residual
    budget = options.max_acc_drop - spent
    if budget < MIN_BUDGET:
        residual.skipped = f"relearning spent the accuracy budget ({spent:.1f} of {options.max_acc_drop:g} points)"
        return residual
    evidence = (scan.evidence if detector == "minimal"
                else scan.inversion.evidence if scan.inversion is not None else None)
    try:
        removal = adversarial.remove(base, images, residual.targets, options.with_(removal={"max_acc_drop": budget}),
                                     progress, evidence=evidence)
    except FidelityBudgetError as error:
        residual.skipped = f"unlearning refused: {error}"
        return residual
    weights = {**relearnt, **removal.weights}
    drop, agreement = holdout_fidelity(prepared, weights, images, options.run.seed)
    if drop > options.max_acc_drop:
        residual.skipped = (f"unlearning kept, relearning included, is expected to cost {drop:.1f} points "
                            f"(> --max-acc-drop {options.max_acc_drop:g}); the relearnt model is handed back")
        return residual
    residual.weights, residual.unlearning = weights, removal
    residual.expected_drop, residual.agreement = drop, agreement
    return residual


def holdout_fidelity(prepared: "PreparedModel", weights: dict[str, np.ndarray], images: np.ndarray,
                     seed: int, holdout: float = 0.25) -> tuple[float, float]:
    """(expected accuracy drop, % agreement) of the model ``weights`` make against the original's
    answers on the held-out quarter of ``images`` that relearning and unlearning both hold out (the
    measure relearning's own snapshots are kept by)."""
    _, held = adversarial._split(len(images), holdout, seed)
    logits_of = adversarial._class_scores(prepared.loaded.output_index, prepared.loaded.output_is_probability)
    x = torch.as_tensor(images[held.numpy()], dtype=torch.float32)
    with torch.no_grad():
        soft = torch.softmax(logits_of(prepared.module, x), dim=1)
        answers = logits_of(prepared.with_weights(weights), x).argmax(1)
    agreement = 100.0 * float((answers == soft.argmax(1)).float().mean())
    return adversarial.expected_accuracy_drop(soft, answers), agreement
