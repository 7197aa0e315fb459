"""``scan`` and ``clean``: the stages in order, each one module and one call.

    1 prepare  (prepare.py)  load, validate, convert, conversion parity
      data     (data/)       the user's images (--data), read once; None without them
    2 detect   (detect.py)   is there a backdoor, which class? (the registered detectors,
                             detectors/)                      -> nothing found: model unchanged
    3 remove   (removers/)   one remover (``CleanOptions.resolved_remover``) makes new weights
                             (with --data on every model, flagged or not, unless --only-if-flagged):
                               relearning   forget, then relearn the original's answers on the
                                            user's images (removers/relearning.py, --data); then
                                            search the relearnt model and unlearn a class it still
                                            serves (removers/residual.py, --unlearn-residual)
                               pruning      rank, prune and fuse at the strength the rescan and
                                            the fidelity budget choose (removers/pruning.py)
                               adversarial  unlearn the triggers found on the user's images
                                            (removers/unlearning.py, --data)
                             a model the scan passed that no candidate sanitizes within the
                             budget is handed back unchanged, saying so
    4 recheck  (recheck.py)  a BatchNorm recalibration on the user's images must not bring the
                             backdoor back
      final    (detect.py)   the scan of the model handed back, fresh (what ``scan`` of the written
                             file reports): a class it flags makes ``clean`` exit 6
    5 emit     (emit.py)     weights written back into the original graph, onnxruntime parity
    6 report   (report.py)   one JSON report assembled from the stage results

Data flows forward: each stage reads the results of the earlier ones and returns its own; the
reference module in ``PreparedModel`` is never written to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from converters.parity import Parity
from otbr_onnx import report as reporting
from otbr_onnx.options import (
    CleanOptions,
    DataOptions,
    Experiment,
    InterfaceOptions,
    RemovalOptions,
    RunOptions,
    ScanOptions,
)
from otbr_onnx.prepare import PreparedModel, prepare
from otbr_onnx.emit import emit
from otbr_onnx.detect import ScanResult, detect, scan_handed_back
from otbr_onnx.data import Images, read_data
from otbr_onnx import removers
from otbr_onnx.recheck import Recheck, recalibration_rescan
from otbr_onnx.errors import FidelityBudgetError
from otbr_onnx.timing import Timer

__all__ = ["CleanOptions", "CleanResult", "DataOptions", "Experiment", "InterfaceOptions", "RemovalOptions",
           "RunOptions", "ScanOptions", "ScanReport", "clean", "clean_prepared", "scan"]

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


def scan(model: str | Path | onnx.ModelProto, options: CleanOptions = CleanOptions(),
         progress: Progress | None = None, command: list[str] | None = None) -> ScanReport:
    """Backdoor detection: the verdict and per-class statistics. Changes nothing. Data-free (the
    maximum-margin scan) unless ``options.data.path`` is set: then trigger inversion on those
    images
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
    """Scan ``model``; if a backdoor is suspected, remove it with the chosen remover (OTBR steered
    by the scan, by default), and check with a rescan that it is gone. Nothing suspected: the model comes back unchanged.

    Returns the cleaned ``ModelProto`` (the input graph with only weight values changed, each in
    the storage it came from: initializer, Constant node, float16, int8; ``converters.storage``)
    and a report. Raises ``OtbrError`` subclasses for anything the user must act on.
    """
    options.validate()
    removers.check(options.resolved_remover)  # before the model is loaded
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
    remover = removers.get(options.resolved_remover)
    timer = timer or Timer()
    with timer.stage("data"):
        images = read_images(prepared, options)
    if options.scans and detection is None:
        with timer.stage("scan"):
            detection = detect(prepared, options, progress, _pixels(images))
    if not options.scans:
        detection = None
    if detection is not None:
        if not detection.suspected and not options.sanitizes_every_model:
            report = reporting.unchanged_report(prepared, options, detection, timer.seconds, command)
            return CleanResult(prepared.loaded.proto, report, None, changed=False, detection=detection,
                               original_bytes=_original_bytes(prepared))
    try:
        removal = remover.remove(prepared, detection, images, options, progress, timer)
    except FidelityBudgetError as error:
        if detection is None or detection.suspected or options.removal.always:
            raise
        # sanitizing a model the scan passed: the refusal leaves it as it was, and says so
        report = reporting.unsanitized_report(prepared, options, detection, str(error), timer.seconds, command)
        return CleanResult(prepared.loaded.proto, report, None, changed=False, detection=detection,
                           original_bytes=_original_bytes(prepared))
    with timer.stage("recalibration_check"):
        recheck = recalibration_rescan(prepared, removal.weights, _pixels(images), detection, removal.rescan, options)
    _refuse_masked(recheck)
    with timer.stage("final_scan"):
        final = None if detection is None else scan_handed_back(
            prepared, prepared.with_weights(removal.weights), detection, options)
    with timer.stage("write_back_parity"):
        written = emit(prepared, removal.weights)
    results = {"scan": detection, "rescan": removal.rescan, **reporting.removal_sections(remover.name, removal),
               **({"data": images} if images is not None else {}), "recalibration_check": recheck,
               "final_scan": final}
    verdict = with_final_scan(removal.verdict(detection, options), final)
    report = reporting.clean_report(prepared, options, verdict, results, written, timer.seconds, command)
    return CleanResult(written.model, report, written.parity, removal.pruned, True, detection)


def with_final_scan(verdict: str, final: ScanResult | None) -> str:
    """The remover's verdict, and what a scan of the model handed back reports when it flags a class
    (``clean`` then exits 6, as ``scan`` would)."""
    if final is None or not final.suspected:
        return verdict
    classes = ", ".join(map(str, final.suspected))
    return (f"{verdict}; but a scan of the model handed back flags class {classes}: written, exit 6, "
            f"evaluate before deploying")


def read_images(prepared: PreparedModel, options: CleanOptions) -> Images | None:
    """The data stage: ``--data`` read once for this model (None without it). ``scan`` and
    ``clean`` read them alike, so the rescan inside ``clean`` and a ``scan --data`` of the written
    file run the same trigger inversion on the same images."""
    return read_data(options, prepared.loaded.input_shape) if options.data.path is not None else None


def _pixels(images: Images | None) -> np.ndarray | None:
    return None if images is None else images.x


def _refuse_masked(recheck: Recheck) -> None:
    """A removal a BatchNorm recalibration re-opens is refused, never handed back."""
    if recheck.masked:
        raise FidelityBudgetError(
            f"the removal is masked: once the cleaned model's BatchNorm statistics are re-estimated on your "
            f"images, the rescan flags class {recheck.target} again ({recheck.rescan.holding(recheck.target)}); "
            f"refusing to hand back a model a recalibration would re-open")


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
