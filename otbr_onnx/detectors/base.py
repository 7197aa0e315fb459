"""What every detector gives and what ``detect`` asks of one: the two protocols of ``detectors/``.

A ``Detection`` is one test's verdict on one model: which classes it suspects, whether a class
is cleared (the question a remover's rescan asks), why each class was flagged, and its report
section. A ``Detector`` is a test that runs on the user's images beside the data-free margin scan
(``detect.DATA_DETECTORS``): it runs once on the model and again, with the same settings, on
each changed copy, so that the rescan and a scan of the written file run the same test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel

Progress = Callable[[str, int, int], None]


class Detection(Protocol):
    """One test's verdict. ``suspected`` is ordered, strongest first."""

    @property
    def suspected(self) -> list[int]: ...

    @property
    def anomaly(self) -> np.ndarray:
        """(C,) each class's statistic over the test's threshold: above 1 is flagged. Detections
        are combined by it (a class flagged by several tests is ordered by its largest)."""
        ...

    @property
    def evidence(self) -> dict[int, list[str]]:
        """Suspected class -> what flags it (the tests, or a test's trigger families)."""
        ...

    def cleared(self, target: int) -> bool:
        """Whether ``target`` no longer stands out: the rescan's question after a removal."""
        ...

    def statistic(self, target: int) -> float:
        """The number ``target`` is judged by (its z), for messages and the report."""
        ...

    def as_dict(self) -> dict: ...


class Detector(Protocol):
    """A test on the user's images. ``name`` keys its evidence in the scan report, ``section``
    its own part of it."""

    name: str
    section: str

    def run(self, prepared: "PreparedModel", options: "CleanOptions", images: np.ndarray | None,
            progress: Progress | None = None) -> Detection | None:
        """The test on ``prepared``'s reference module; None where it does not apply (no images,
        too many classes), which the scan report shows as ``null``."""
        ...

    def rerun(self, module: "nn.Module", before: Detection, num_classes: int, output_index: int,
              is_probability: bool) -> Detection | None:
        """The same test, with ``before``'s settings and images, on a changed module."""
        ...
