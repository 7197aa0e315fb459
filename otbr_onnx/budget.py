"""Bounded work: refuse a scan whose size the model file decides before it starts.

The scan's cost is classes x starts x steps forward+backward passes of the model (detectors/margin.py:
with more than ``refine`` classes every class is first screened with one start and a quarter of
the steps, then the ``refine`` largest are searched in full). Starts and steps are the user's
options; the class count is the model's, so a small file whose classifier has 100,000 classes
(a tiled Gemm) would make a CI gate run for hours with nothing to show. The cost of one pass is
bounded by the loader's caps (--max-nodes, --max-tensor-elements); the class count is bounded
here, by ``CleanOptions.scan.max_classes`` (``--max-classes``), before the first pass.
"""

from __future__ import annotations

from otbr_onnx.detectors.margin import ScanConfig
from otbr_onnx.errors import UnsupportedModelError
from otbr_onnx.options import CleanOptions


def scan_passes(num_classes: int, starts: int, steps: int, refine: int = ScanConfig.refine) -> int:
    """Image forward+backward passes of one scan of ``num_classes`` classes (detectors.margin.scan_module:
    the screening of every class where there are more than ``refine``, then the full search;
    each search scores its final step with one more forward pass)."""
    screened = num_classes * (max(steps // 4, 1) + 1) if num_classes > refine else 0
    return screened + min(num_classes, refine) * starts * (steps + 1)


def check_work(num_classes: int, options: CleanOptions) -> None:
    """Refuse (exit 3, one line naming --max-classes) a model with more classes than
    ``options.scan.max_classes``; called once the class count is known, before the scan."""
    if num_classes <= options.scan.max_classes:
        return
    passes = scan_passes(num_classes, options.scan.starts, options.scan.steps)
    raise UnsupportedModelError(
        f"the model has {num_classes} classes, above the --max-classes limit of {options.scan.max_classes}: its scan "
        f"alone would take {passes:,} image passes (forward and backward); raise --max-classes to scan it anyway"
    )
