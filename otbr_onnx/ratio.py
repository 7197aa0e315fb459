"""Stage 4 (select): choose the pruning ratio gamma without data, and check each candidate.

The paper picks gamma per model by sweeping it on test data; a data-free tool cannot, and no
single gamma fits every model (benchmarks/RESULTS.md). Candidates 0.005 .. 0.2 are tried smallest
first; each is pruned and fused in full (``repair.py``) and evaluated on a copy of the model:

* **fidelity**: soft agreement on probes synthesised from the model (``probes.py``), labelled
  with the original's own answers (the cleaned model's mean probability for those answers, as %
  of the original's), or accuracy on the user's clean ``--calibration`` images. The budget
  (``max_disagreement`` %, or ``max_acc_drop`` points) bounds what the cleaning may cost.
* **rescan** (when the scan suspected a class ``t``): the scan again on the candidate, warm-started
  from the old maximisers (``detect.rescan_module``); the candidate *removes* the backdoor when
  ``t``'s maximum margin is no larger than the typical class's (robust z <= ``detectors.margin.CLEARED_Z``,
  far stricter than merely falling under the detection threshold).

Rules:

* a class is suspected: the SMALLEST candidate whose rescan no longer flags ``t`` and whose
  fidelity is within budget. The scan stops at the first candidate over budget (damage grows with
  gamma). If none qualifies, ``clean`` refuses (exit 3) and says which check failed.
* nothing is suspected (``clean --always``): the LARGEST candidate within budget, scanning upwards
  and stopping at the first over budget; refusal when even the smallest is over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import softmax

from otbr_onnx import probes
from otbr_onnx.errors import FidelityBudgetError, UnsupportedModelError
from otbr_onnx.options import CleanOptions
from otbr_onnx.rank import Ranking
from otbr_onnx.repair import Repair, repair
from otbr_onnx.detect import CLEARED_Z, ScanResult, rescan_prepared

if TYPE_CHECKING:
    from torch import nn

    from otbr_onnx.data import Images
    from otbr_onnx.prepare import PreparedModel

CANDIDATE_RATIOS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2)
Progress = Callable[[str, int, int], None]


@dataclass
class Trial:
    """One candidate: its strength (opaque here; the pruning remover's is the prune ratio), its
    fidelity score, and (with a suspect) whether the rescan still flags it."""

    strength: float
    score: float
    flagged: bool | None = None
    target_z: float | None = None
    rescan: ScanResult | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        # "ratio" repeats the strength for readers of schema 2, which named it so
        out = {"strength": self.strength, "ratio": self.strength, "score": self.score}
        if self.flagged is not None:
            out.update(still_flagged=self.flagged, target_z=self.target_z)
        return out


@dataclass
class Selection:
    """How the strength was chosen: the reference set, the budget, every trial, and the choice."""

    rule: str  # "smallest ratio the rescan clears" or "largest ratio within the budget"
    source: str  # "synthesised probes" or "calibration images"
    metric: str  # "soft agreement" or "accuracy"
    images: int
    baseline: float
    budget: float
    trials: list[Trial]
    chosen_strength: float | None
    chosen: Repair | None = field(default=None, repr=False)

    @property
    def chosen_trial(self) -> Trial | None:
        return next((t for t in self.trials if t.strength == self.chosen_strength), None)

    def as_dict(self) -> dict:
        # "chosen_ratio" repeats the choice for readers of schema 2, which named it so
        return {"rule": self.rule, "source": self.source, "metric": self.metric, "images": self.images,
                "baseline": self.baseline, "budget": self.budget, "chosen_strength": self.chosen_strength,
                "chosen_ratio": self.chosen_strength, "trials": [t.as_dict() for t in self.trials]}


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


def choose_ratio(candidates: list[float], trial_at: Callable[[float], Trial], baseline: float,
                 budget: float) -> tuple[list[Trial], float | None]:
    """Fidelity first: scan ``candidates`` upwards; keep the last whose score stays within
    ``budget`` points of ``baseline``. Returns the trials run and the choice (None: the first is
    over budget)."""
    if not candidates:
        raise ValueError("no candidate ratio prunes any neuron")
    trials: list[Trial] = []
    chosen = None
    for ratio in candidates:
        trial = trial_at(ratio)
        trials.append(trial)
        if baseline - trial.score > budget:
            break
        chosen = ratio
    return trials, chosen


def choose_removing_ratio(candidates: list[float], trial_at: Callable[[float], Trial], baseline: float,
                          budget: float) -> tuple[list[Trial], float | None]:
    """Removal first: the smallest candidate whose trial is no longer flagged, within ``budget``;
    stops at the first candidate over budget. Returns the trials run and the choice (or None)."""
    if not candidates:
        raise ValueError("no candidate ratio prunes any neuron")
    trials: list[Trial] = []
    for ratio in candidates:
        trial = trial_at(ratio)
        trials.append(trial)
        if baseline - trial.score > budget:
            return trials, None
        if not trial.flagged:
            return trials, ratio
    return trials, None


def soft_agreement(prepared: "PreparedModel", module: "nn.Module", x: np.ndarray, y: np.ndarray) -> float:
    """``module``'s mean probability for the answers ``y`` on ``x``.

    Soft rather than top-1: probes are confident class impressions, and a damaged model keeps
    most of their top-1 answers while losing confidence. Measured on the benchmark (24 models x
    gammas 0.01/0.02/0.05), the top-1 disagreement was about half the real relative accuracy
    loss; the soft one about 1.2x, with the better rank correlation (0.65 against 0.61).
    """
    scores = prepared.outputs(module, x).astype(np.float64)
    if prepared.loaded.output_is_probability:
        probabilities = scores / scores.sum(axis=1, keepdims=True)
    else:
        probabilities = softmax(scores, axis=1)
    return float(np.mean(probabilities[np.arange(len(y)), y]))


def accuracy(prepared: "PreparedModel", module: "nn.Module", x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float(np.mean(prepared.outputs(module, x).argmax(axis=1) == y)) if len(y) else 0.0


@dataclass
class ReferenceSet:
    """The images a candidate's fidelity is measured on, and how."""

    source: str
    metric: str
    budget: float
    x: np.ndarray
    y: np.ndarray

    def score(self, prepared: "PreparedModel", module: "nn.Module", reference: float | None = None) -> float:
        if self.metric == "accuracy":
            return accuracy(prepared, module, self.x, self.y)
        value = soft_agreement(prepared, module, self.x, self.y)
        return 100.0 * value / max(reference, 1e-12) if reference is not None else value


def reference_set(prepared: "PreparedModel", options: CleanOptions, progress: Progress | None = None,
                  images: "Images | None" = None) -> ReferenceSet:
    """The user's calibration images, the user's own images (``images``, read by the data stage
    from ``--data``: labelled with their given labels, else with the original's own answers, so
    the score is top-1 agreement), or probes synthesised from the model and labelled by it."""
    if options.data.calibration is not None:
        x, y = _calibration_images(prepared, options)
        return ReferenceSet("calibration images", "accuracy", options.max_acc_drop, x, y)
    if images is not None:
        return _data_images(prepared, options, images)
    loaded = prepared.loaded
    config = probes.ProbeConfig(count=options.data.probes, seed=options.run.seed, device=prepared.device,
                                input_range=options.interface.input_range, chunking=prepared.probe_chunking)
    on_step = (lambda step: progress("probes", step + 1, config.steps)) if progress else None
    x = probes.synthesise_probes(prepared.module, loaded.input_shape, prepared.num_classes, loaded.output_index,
                                 loaded.output_is_probability, config, on_step)
    y = prepared.outputs(prepared.module, x).argmax(axis=1)  # the original's own answers
    return ReferenceSet("synthesised probes", "soft agreement", options.removal.max_disagreement, x, y)


def select(prepared: "PreparedModel", ranking: Ranking, options: CleanOptions, detection: ScanResult | None,
           progress: Progress | None = None, images: "Images | None" = None) -> Selection:
    """Try the candidates (see the module docstring) and return the choice, or refuse. The rule
    is the rescan's whenever the scan suspected a class, whatever the ranking."""
    ranked_neurons = sum(prepared.layers[i].out_channels for i in ranking.ranked)
    candidates = distinct_candidates(CANDIDATE_RATIOS, ranked_neurons)
    if not candidates:
        raise UnsupportedModelError(
            f"only {ranked_neurons} ranked neurons: no candidate ratio up to {max(CANDIDATE_RATIOS)} "
            f"prunes any; set --prune-ratio explicitly"
        )
    references = reference_set(prepared, options, progress, images)
    raw_reference = None if references.metric == "accuracy" else references.score(prepared, prepared.module)
    baseline = references.score(prepared, prepared.module, raw_reference)
    repairs: dict[float, Repair] = {}
    target = detection.suspected[0] if detection is not None and detection.suspected else None

    def trial_at(ratio: float) -> Trial:
        if progress:
            progress("ratio candidates", candidates.index(ratio) + 1, len(candidates))
        for older in list(repairs)[:-1]:  # the choice is this candidate or the one before: a
            del repairs[older]             # ResNet-50 holds 100 MB of weights per candidate
        repairs[ratio] = repair(prepared, ranking, ratio, options)
        module = prepared.with_weights(repairs[ratio].weights)
        score = references.score(prepared, module, raw_reference)
        if target is None:
            return Trial(ratio, score)
        after = rescan_prepared(prepared, module, detection, options)
        return Trial(ratio, score, not after.cleared(target), after.statistic(target), after)

    if target is not None:
        trials, chosen = choose_removing_ratio(candidates, trial_at, baseline, references.budget)
        rule = "smallest ratio the rescan clears"
    else:
        trials, chosen = choose_ratio(candidates, trial_at, baseline, references.budget)
        rule = "largest ratio within the budget"
    selection = Selection(rule, references.source, references.metric, int(len(references.y)), baseline,
                          references.budget, trials, chosen, repairs.get(chosen) if chosen is not None else None)
    if chosen is None:
        raise refusal(selection, target)
    return selection


def refusal(selection: Selection, target: int | None) -> FidelityBudgetError:
    """Why no candidate qualified, on one line, naming the check that failed."""
    last = selection.trials[-1]
    over = selection.baseline - last.score > selection.budget
    option = "--max-disagreement" if selection.metric == "soft agreement" else "--max-acc-drop"
    images = f"{selection.images} {selection.source}"
    if selection.metric == "soft agreement":
        damage = f"loses {selection.baseline - last.score:.1f}% of the original's confidence in its answers on {images}"
    else:
        damage = f"costs {selection.baseline - last.score:.1f} accuracy points on {images}"
    if target is not None and over:
        return FidelityBudgetError(
            f"the rescan still flags class {target} at every ratio within {option} {selection.budget:g}: at "
            f"{last.strength} the cleaning {damage}; refusing to write a model that is damaged or still backdoored"
        )
    if target is not None:
        return FidelityBudgetError(
            f"the rescan still flags class {target} at every candidate ratio up to {last.strength} "
            f"(z {last.target_z:.1f} > {CLEARED_Z:g}); the backdoor could not be removed, refusing"
        )
    return FidelityBudgetError(
        f"no prune ratio stays within {option} {selection.budget:g}: the smallest, {last.strength}, {damage}; "
        f"refusing to write a damaged model (raise {option}, or force one with --prune-ratio)"
    )


def _data_images(prepared: "PreparedModel", options: CleanOptions, images: "Images") -> ReferenceSet:
    """``--data``: real images instead of probes. With labels the score is accuracy; without, the
    share of images on which the candidate gives the original's answer (the original scores 100)."""
    if images.y is not None:
        return ReferenceSet(f"labelled user images ({images.source})", "accuracy", options.max_acc_drop,
                            images.x, images.y)
    answers = prepared.outputs(prepared.module, images.x).argmax(axis=1)
    return ReferenceSet(f"user images ({images.source}), the original's answers", "accuracy",
                        options.max_acc_drop, images.x, answers)


def _calibration_images(prepared: "PreparedModel", options: CleanOptions) -> tuple[np.ndarray, np.ndarray]:
    from otbr_onnx.data import read_calibration

    return read_calibration(options.data.calibration, options.limits.max_file_bytes, prepared.loaded.input_shape)
