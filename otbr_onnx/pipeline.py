"""``scan`` and ``clean``: the stages in order, each one module and one call.

    1 prepare  (prepare.py)  load, validate, convert, conversion parity
      data     (data/)       the user's images (--data), read once; None without them
    2 detect   (detect.py)   is there a backdoor, which class?      -> nothing found: model unchanged
    then one remover (``CleanOptions.resolved_remover``):
      pruning (data-free, or --remover pruning):
    3 rank     (rank.py)     target-aware activation score, or NWC after random unlearning
    4 select   (ratio.py)    candidates pruned and fused (repair.py), each checked for fidelity and
                             rescanned; the smallest one the rescan clears is kept (nothing
                             suspected, ``always``: the largest within the fidelity budget)
      adversarial (--data):
    3 unlearn  (removers/adversarial.py)  triggers found on the user's images are unlearnt, the
                             original's answers kept; the round chosen on held-out images; a
                             BatchNorm recalibration must not bring the triggers back
    4 rescan   (detect.py)   the scan again on the cleaned module
    5 emit     (emit.py)     weights written back into the original graph, onnxruntime parity
    6 report   (report.py)   one JSON report assembled from the stage results

(A fixed ``prune_ratio`` without calibration images, or ``method="clp"``, skips the choice in 4.)

Data flows forward: each stage reads the results of the earlier ones and returns its own; the
reference module in ``PreparedModel`` is never written to.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from converters.parity import Parity
from otbr_onnx import report as reporting
from otbr_onnx.options import CleanOptions, Experiment
from otbr_onnx.prepare import PreparedModel, prepare
from otbr_onnx.rank import Ranking, activation_ranking, clp_ranking, nwc_ranking
from otbr_onnx.ratio import Selection, select
from otbr_onnx.repair import Repair, repair
from otbr_onnx.emit import emit
from otbr_onnx.detect import ScanResult, detect, rescan_prepared, scan_config
from otbr_onnx.data import Images, read_data
from otbr_onnx.removers import adversarial
from otbr_onnx.recheck import recalibration_rescan
from otbr_onnx.errors import FidelityBudgetError

__all__ = ["CleanOptions", "CleanResult", "Experiment", "ScanReport", "clean", "clean_prepared", "scan"]

LOG = logging.getLogger("otbr_onnx")
Progress = Callable[[str, int, int], None]


@dataclass
class CleanResult:
    """The cleaned model (or the input, unchanged, when the scan found nothing) and its report."""

    model: onnx.ModelProto
    report: dict
    parity: Parity | None
    pruned: dict[str, int] = field(default_factory=dict)
    changed: bool = True
    detection: ScanResult | None = None
    original_bytes: bytes | None = field(default=None, repr=False)  # what an unchanged model is written as

    def to_bytes(self) -> bytes:
        if not self.changed and self.original_bytes is not None:
            return self.original_bytes
        return self.model.SerializeToString(deterministic=True)


@dataclass
class ScanReport:
    """What ``scan`` found, and its report."""

    result: ScanResult
    report: dict

    @property
    def backdoor_suspected(self) -> bool:
        return self.result.backdoor_suspected


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 4)
        LOG.info("%s: %.2fs", name, self.seconds[name])


def scan(model: str | Path | onnx.ModelProto, options: CleanOptions = CleanOptions(),
         progress: Progress | None = None, command: list[str] | None = None) -> ScanReport:
    """Backdoor detection: the verdict and per-class statistics. Changes nothing. Data-free (the
    maximum-margin scan) unless ``options.data`` is set: then trigger inversion on those images
    as well (``detect``)."""
    options.validate()
    timer = Timer()
    with timer.stage("prepare"):
        prepared = prepare(model, options)
    with timer.stage("scan"):
        detection = detect(prepared, options, progress, _pixels(read_images(prepared, options)))
    return ScanReport(detection, reporting.scan_report(prepared, options, detection, timer.seconds, command))


def clean(model: str | Path | onnx.ModelProto, options: CleanOptions = CleanOptions(),
          progress: Progress | None = None, command: list[str] | None = None) -> CleanResult:
    """Scan ``model``; if a backdoor is suspected, remove it with OTBR steered by the scan, and
    check with a rescan that it is gone. Nothing suspected: the model comes back unchanged.

    Returns the cleaned ``ModelProto`` (the input graph with only weight values changed, each in
    the storage it came from: initializer, Constant node, float16, int8; ``converters.storage``)
    and a report. Raises ``OtbrError`` subclasses for anything the user must act on.
    """
    options.validate()
    timer = Timer()
    with timer.stage("prepare"):
        prepared = prepare(model, options)
    return clean_prepared(prepared, options, None, progress, command, timer)


def clean_prepared(prepared: PreparedModel, options: CleanOptions, detection: ScanResult | None = None,
                   progress: Progress | None = None, command: list[str] | None = None,
                   timer: Timer | None = None) -> CleanResult:
    """``clean`` from an already prepared model, and optionally its scan (``detect`` with the
    same scan options), so that several cleanings of one model share both (the benchmarks)."""
    options.validate()
    timer = timer or Timer()
    with timer.stage("data"):
        images = read_images(prepared, options)
    if options.scans and detection is None:
        with timer.stage("scan"):
            detection = detect(prepared, options, progress, _pixels(images))
    if not options.scans:
        detection = None
    if detection is not None:
        if not detection.suspected and not options.always:
            report = reporting.unchanged_report(prepared, options, detection, timer.seconds, command)
            return CleanResult(prepared.loaded.proto, report, None, changed=False, detection=detection,
                               original_bytes=_original_bytes(prepared))
    if options.resolved_remover == "adversarial":
        return clean_adversarially(prepared, options, detection, images, progress, command, timer)
    with timer.stage("ranking"):
        ranking = rank(prepared, options, detection, progress)
    with timer.stage("ratio_selection" if selects_ratio(options, ranking) else "repair"):
        selection, chosen = choose(prepared, ranking, options, detection, progress, images)
    with timer.stage("rescan"):
        rescan = verify_removal(prepared, chosen, selection, detection, options)
    with timer.stage("recalibration_check"):
        recheck = recalibration_rescan(prepared, chosen.weights, _pixels(images), detection, rescan, options)
    _refuse_masked(recheck)
    with timer.stage("write_back_parity"):
        cleaned, after, notes, float_copy = emit(prepared, chosen.weights)
    report = reporting.clean_report(prepared, options, detection, ranking, selection, chosen, rescan, after,
                                    timer.seconds, command, notes, float_copy)
    report["recalibration_check"] = recheck.as_dict()
    pruned = {prepared.layers[i].label: int(m.sum()) for i, m in chosen.masks.items() if m.any()}
    return CleanResult(cleaned, report, after, pruned, True, detection)


def read_images(prepared: PreparedModel, options: CleanOptions) -> Images | None:
    """The data stage: ``--data`` read once for this model (None without it). ``scan`` and
    ``clean`` read them alike, so the rescan inside ``clean`` and a ``scan --data`` of the written
    file run the same trigger inversion on the same images."""
    return read_data(options, prepared.loaded.input_shape) if options.data is not None else None


def _pixels(images: Images | None) -> np.ndarray | None:
    return None if images is None else images.x


def clean_adversarially(prepared: PreparedModel, options: CleanOptions, detection: ScanResult | None,
                        images: Images, progress: Progress | None, command: list[str] | None,
                        timer: Timer) -> CleanResult:
    """Stages 3-6 with the adversarial remover: unlearn on the user's images, rescan, emit, report."""
    targets = list(detection.suspected) if detection is not None else []
    with timer.stage("unlearning"):
        evidence = detection.inversion.evidence if detection is not None and detection.inversion is not None else None
        removal = adversarial.remove(prepared, images.x, targets, options, progress, evidence=evidence)
    with timer.stage("rescan"):
        after_scan = None if detection is None else rescan_prepared(
            prepared, prepared.with_weights(removal.weights), detection, options)
    still = [t for t in targets if after_scan is not None and not after_scan.cleared(t)]
    if still:  # the same rule as the pruning path's: a target the rescan still flags is not removed
        raise FidelityBudgetError(
            f"after adversarial unlearning the rescan still flags class {still[0]} "
            f"(z {after_scan.z[still[0]]:.1f}); refusing to hand back a model that is not cleaned")
    with timer.stage("recalibration_check"):
        recheck = recalibration_rescan(prepared, removal.weights, images.x, detection, after_scan, options)
    _refuse_masked(recheck)
    with timer.stage("write_back_parity"):
        cleaned, after, notes, float_copy = emit(prepared, removal.weights)
    report = reporting.removal_report(prepared, options, detection, removal, after_scan, after, timer.seconds,
                                      command, notes, float_copy, images)
    report["recalibration_check"] = recheck.as_dict()
    return CleanResult(cleaned, report, after, {}, True, detection)


def _refuse_masked(recheck) -> None:
    """A removal a BatchNorm recalibration re-opens is refused, never handed back."""
    if recheck.masked:
        raise FidelityBudgetError(
            f"the removal is masked: once the cleaned model's BatchNorm statistics are re-estimated on your "
            f"images, the rescan flags class {recheck.target} again (z {recheck.z_after:.1f}); refusing to hand "
            f"back a model a recalibration would re-open")


def rank(prepared: PreparedModel, options: CleanOptions, detection: ScanResult | None,
         progress: Progress | None = None) -> Ranking:
    """The neuron scores ``options.ranking`` asks for (``auto``: activation given a suspect)."""
    if options.method == "clp":
        return clp_ranking(prepared, options)
    wants_target = options.ranking == "activation" or (options.ranking == "auto" and detection is not None
                                                       and bool(detection.suspected))
    if not wants_target:
        return nwc_ranking(prepared, options, progress)
    target = detection.suspected[0] if detection.suspected else detection.top_class
    others = [detection.inputs[c] for c in detection.refined if c != target]
    return activation_ranking(prepared, options, target, detection.inputs[target], _stack(others))


def choose(prepared: PreparedModel, ranking: Ranking, options: CleanOptions, detection: ScanResult | None,
           progress: Progress | None = None, images: Images | None = None) -> tuple[Selection | None, Repair]:
    """A fixed ratio (or CLP's own masks) as given, else the ratio rule of ``ratio.py``."""
    if not selects_ratio(options, ranking):
        return None, repair(prepared, ranking, options.prune_ratio, options)
    config = scan_config(options, prepared.device, prepared.chunking, prepared.scan_block)
    selection = select(prepared, ranking, options, detection, config, progress, images)
    return selection, selection.chosen


def selects_ratio(options: CleanOptions, ranking: Ranking) -> bool:
    """Whether gamma is chosen per model: not for CLP (its own masks) nor a fixed --prune-ratio
    (calibration images always decide it)."""
    return ranking.source != "clp" and (options.prune_ratio is None or options.calibration is not None)


def verify_removal(prepared: PreparedModel, chosen: Repair, selection: Selection | None,
                   detection: ScanResult | None, options: CleanOptions) -> ScanResult | None:
    """The rescan of the model handed back: the chosen trial's, or a new one."""
    if detection is None:
        return None
    trial = selection.chosen_trial if selection is not None else None
    if trial is not None and trial.rescan is not None:
        return trial.rescan
    return rescan_prepared(prepared, prepared.with_weights(chosen.weights), detection, options)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0,))


def _original_bytes(prepared: PreparedModel) -> bytes | None:
    """The input file's own bytes, for a byte-identical pass-through. None where a ``ModelProto``
    was given, the file changed since it was checked, or its weights live in external data (the
    model is then written with them inlined, as it was checked)."""
    path = prepared.loaded.path
    if path is None:
        return None
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != prepared.loaded.sha256:
        return None
    tensors = onnx.load_model_from_string(data).graph.initializer
    return None if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors) else data
