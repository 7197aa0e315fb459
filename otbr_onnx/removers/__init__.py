"""The removers (``removers.base.Remover``), by the name ``CleanOptions.resolved_remover`` gives.
A new remover is one module here and one line in ``REMOVERS``."""

from __future__ import annotations

from otbr_onnx.removers import pruning, unlearning
from otbr_onnx.removers.base import Remover

REMOVERS: dict[str, Remover] = {
    pruning.REMOVER.name: pruning.REMOVER,
    unlearning.REMOVER.name: unlearning.REMOVER,
}
