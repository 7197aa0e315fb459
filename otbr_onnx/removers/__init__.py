"""The removers (``removers.base.Remover``), by the name ``CleanOptions.resolved_remover`` gives.
A new remover is one module here (defining ``REMOVER``) and one line in ``MODULES``.

The names are read by ``options`` and the command line's ``--remover`` choice, which must not load
torch (``otbr-onnx --help``), so a remover's module is imported only when it is asked for (``get``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otbr_onnx.removers.base import Remover

# name -> the module whose ``REMOVER`` it is
MODULES: dict[str, str] = {
    "pruning": "otbr_onnx.removers.pruning",
    "adversarial": "otbr_onnx.removers.unlearning",
}


def get(name: str) -> "Remover":
    """The remover registered under ``name`` (a key of ``MODULES``; KeyError otherwise)."""
    remover = importlib.import_module(MODULES[name]).REMOVER
    if remover.name != name:
        raise LookupError(f"{MODULES[name]}.REMOVER is named {remover.name!r}, registered as {name!r}")
    return remover
