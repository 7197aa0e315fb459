"""Stage 2 (detect): run the registered detectors on the model and combine their verdicts.

The data-free maximum-margin scan (``detectors/margin.py``, MM-BD) always runs: it needs nothing
but the model, and its maximisers steer the pruning remover's activation ranking. Given the
user's images (``--data``), every detector of ``DATA_DETECTORS`` runs beside it (today trigger
inversion, ``detectors/inversion.py``), and a class flagged by any test is suspected
(``combine``). A new detector is one module in ``detectors/`` (a ``detectors.base.Detector``) and
one line in ``DATA_DETECTORS``.

The rescan (``rescan_module``) reruns every test that ran, with the same settings, on a changed
copy of the model: the check every remover and the recalibration check make. Its margin part is
warm-started from the maximisers found before (a surviving backdoor is found again at once), so it
can differ from a fresh scan; ``scan_handed_back`` is the fresh one, the test ``scan`` of the
written file runs, on which ``clean``'s verdict and exit code rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from otbr_onnx.detectors import inversion
from otbr_onnx.detectors.base import Detection, Detector
from otbr_onnx.detectors.margin import (  # noqa: F401  (the scan's types and constants, read here by callers)
    CLEARED_Z, DEFAULT_THRESHOLD, ScanConfig, ScanResult, rescan_margins, scan_config, scan_module,
)

if TYPE_CHECKING:
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel

# The tests run beside the margin scan on the user's images, in the order the report lists them.
DATA_DETECTORS: tuple[Detector, ...] = (
    inversion.DETECTOR,
)

# With the user's images the margin test's threshold is raised to this calibrated value (never
# lowered): on the 11 clean models of benchmarks/DETECTION.md the margin's robust z reached 17.8
# (a PreAct from seed 1), 11.3 and 7.7, so the data-free 3.5 flags 3 of 11 clean models; 18.8 is
# the largest clean value + 1, the rule the inversion's thresholds follow (set for no false alarm
# on the clean calibration models; leave-one-model-out estimate 1/11). The trigger inversion
# covers most of what the margin test then no longer flags (benchmarks/DETECTION.md).
MARGIN_Z_WITH_DATA = 18.8


def combine(margin: ScanResult, others: dict[Detector, Detection | None]) -> ScanResult:
    """``margin`` with the detections run beside it: a class flagged by any test is suspected,
    ordered by its largest anomaly (statistic over threshold) across the tests. Once any of them
    ran, the margin test's threshold becomes ``max(threshold, MARGIN_Z_WITH_DATA)``, calibrated
    on clean models with the tests beside it."""
    ran = [found for found in others.values() if found is not None]
    if not ran:
        return ScanResult(margin.margins, margin.z, margin.threshold, margin.suspected, margin.inputs,
                          margin.start_margins, margin.refined, margin.steps, dict(others))
    threshold = max(margin.threshold, MARGIN_Z_WITH_DATA)
    raised = ScanResult(margin.margins, margin.z, threshold, [], margin.inputs, margin.start_margins,
                        margin.refined, margin.steps)
    flagged = set(raised.margin_suspected).union(*(found.suspected for found in ran))
    if margin.inconclusive:
        flagged = set()
    strength = np.max([raised.anomaly] + [found.anomaly for found in ran], axis=0)
    suspected = sorted(flagged, key=lambda c: (-strength[c], c))
    return ScanResult(margin.margins, margin.z, threshold, [int(c) for c in suspected], margin.inputs,
                      margin.start_margins, margin.refined, margin.steps, dict(others))


def detect(prepared: "PreparedModel", options: "CleanOptions", progress: Callable[[str, int, int], None] | None = None,
           images: np.ndarray | None = None) -> ScanResult:
    """Stage 2 (detect): scan ``prepared``'s reference module (a ``prepare.PreparedModel``) and
    run every detector of ``DATA_DETECTORS`` on the user's ``images`` (``read_data(...).x``: the
    model's layout and range; None: none runs, and the report shows each as ``null``); a class
    flagged by any test is suspected."""
    loaded = prepared.loaded
    on_step = (lambda done, total: progress("scan", done, total)) if progress else None
    margin = scan_module(prepared.module, loaded.input_shape, prepared.num_classes, loaded.output_index,
                         loaded.output_is_probability,
                         prepared_config(prepared, options), on_step)
    return combine(margin, {detector: detector.run(prepared, options, images, progress)
                            for detector in DATA_DETECTORS})


def rescan_module(
    module: nn.Module,
    input_shape: tuple[int, ...],
    before: ScanResult,
    output_index: int,
    is_probability: bool,
    config: ScanConfig = ScanConfig(),
) -> ScanResult:
    """Every test of ``before`` again on a changed model: the margin scan warm-started from its
    maximisers (``detectors.margin.rescan_margins``), and each detector that ran beside it with
    its own settings and images."""
    after = rescan_margins(module, input_shape, before, output_index, is_probability, config)
    return combine(after, rerun_detectors(module, before, len(after.margins), output_index, is_probability))


def rerun_detectors(module: nn.Module, before: ScanResult, num_classes: int, output_index: int,
                    is_probability: bool) -> dict[Detector, Detection | None]:
    """Each detector that ran beside ``before``'s margin scan, rerun on ``module`` with its own
    settings, images and seed (None where it did not run)."""
    return {detector: None if found is None else detector.rerun(module, found, num_classes, output_index,
                                                                  is_probability)
            for detector, found in before.others.items()}


def rescan_prepared(prepared: "PreparedModel", module: nn.Module, before: ScanResult,
                    options: "CleanOptions") -> ScanResult:
    """``rescan_module`` of ``module`` (a changed copy of ``prepared``'s) with the scan's settings
    from ``options`` and ``prepared``'s memory plan: the rescan every remover and check runs."""
    loaded = prepared.loaded
    return rescan_module(module, loaded.input_shape, before, loaded.output_index, loaded.output_is_probability,
                         prepared_config(prepared, options))


def scan_handed_back(prepared: "PreparedModel", module: nn.Module, before: ScanResult,
                     options: "CleanOptions") -> ScanResult:
    """What ``scan`` of the written model reports, run on ``module`` (the cleaned copy of
    ``prepared``'s): the margin scan from fresh random starts with the scan's settings and seed
    (not warm-started, as ``rescan_module`` is), and each detector of ``before`` rerun on the same
    images with the same settings and seed."""
    loaded = prepared.loaded
    margin = scan_module(module, loaded.input_shape, prepared.num_classes, loaded.output_index,
                         loaded.output_is_probability, prepared_config(prepared, options))
    return combine(margin, rerun_detectors(module, before, prepared.num_classes, loaded.output_index,
                                           loaded.output_is_probability))


def prepared_config(prepared: "PreparedModel", options: "CleanOptions") -> ScanConfig:
    """The margin scan's settings for ``prepared``: ``options``' scan fields, its device and the
    images per pass its memory plan allows (every scan and rescan of one model uses these)."""
    return scan_config(options, prepared.device, prepared.chunking, prepared.scan_block)
