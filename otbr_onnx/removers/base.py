"""What a remover is to the pipeline: the two protocols of ``removers/``.

A ``Remover`` takes the prepared model, the scan's detection and the user's images (or None) and
returns a ``Removal``: the new weights, the rescan of the model they make, and what the report
shows of it. The pipeline picks one by ``CleanOptions.resolved_remover`` with ``removers.get``
(``removers/__init__.py``) and runs the same stages after any of them: the recalibration check,
write-back and parity, the report. A remover refuses (raises ``FidelityBudgetError``) rather than
hand back a model its own rule does not accept.

Candidates are opaque: a remover tries them at a ``strength`` (the pruning remover's is the
prune ratio, the adversarial one's the unlearning round kept), and the report and the batch
table show that number and its fidelity without knowing what it measures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from otbr_onnx.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

    from otbr_onnx.data import Images
    from otbr_onnx.detect import ScanResult
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel
    from otbr_onnx.timing import Timer

Progress = Callable[[str, int, int], None]


class Removal(Protocol):
    """One remover's result."""

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """Initializer -> new value (ONNX layout, finite): what write-back puts into the graph."""
        ...

    @property
    def rescan(self) -> "ScanResult | None":
        """The scan again on the model handed back (None: the scan did not run)."""
        ...

    @property
    def strength(self) -> float | None:
        """The candidate kept (None: the remover has no candidates, e.g. CLP's own masks)."""
        ...

    @property
    def fidelity(self) -> tuple[float, str] | None:
        """The kept candidate's fidelity score (%) and its metric, where one was measured."""
        ...

    @property
    def pruned(self) -> dict[str, int]:
        """Layer -> neurons pruned (empty for a remover that prunes nothing)."""
        ...

    def verdict(self, detection: "ScanResult | None", options: "CleanOptions") -> str:
        """The report's one-line verdict on this removal."""
        ...

    def as_dict(self) -> dict:
        """The report sections this removal adds, by key."""
        ...


class Remover(Protocol):
    """A way to remove a backdoor. ``remove`` times its own stages in ``timer``."""

    name: str

    def remove(self, prepared: "PreparedModel", detection: "ScanResult | None", images: "Images | None",
               options: "CleanOptions", progress: Progress | None, timer: "Timer") -> Removal: ...


def changed_weights(prepared: "PreparedModel", module: "nn.Module", what: str) -> dict[str, np.ndarray]:
    """The tensors of ``prepared.refs`` whose value in ``module`` differs from the original (ONNX
    layout): what write-back puts into the graph. Non-finite values are refused, naming ``what``
    produced them."""
    weights = {}
    for name, ref in prepared.refs.items():
        value = ref.read(module)
        if not np.all(np.isfinite(value)):
            raise UnsupportedModelError(f"{what} produced non-finite weights in '{name}'; refusing to write")
        if not np.array_equal(value, prepared.original[name]):
            weights[name] = value
    return weights
