"""The removers (``removers.base.Remover``), by the name ``CleanOptions.resolved_remover`` gives.
A new remover is one module here (defining ``REMOVER``) and one line in ``MODULES``.

The command line's ``--remover`` choice reads the names (``choices``) and must not load torch
(``otbr-onnx --help``), so a remover's module is imported only when it is asked for (``get``).
``options`` never reads this registry: the remover modules read the options, and a registry the
options read would close a circle through them (tests/test_architecture.py counts names in a
registry as imports).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from otbr_onnx.errors import UsageError

if TYPE_CHECKING:
    from otbr_onnx.removers.base import Remover

# name -> the module whose ``REMOVER`` it is
MODULES: dict[str, str] = {
    "pruning": "otbr_onnx.removers.pruning",
    "adversarial": "otbr_onnx.removers.unlearning",
    "relearning": "otbr_onnx.removers.relearning",
}


def choices() -> tuple[str, ...]:
    """What ``--remover`` accepts: ``auto`` (``CleanOptions.resolved_remover`` picks) and every
    registered name, as the registry is now."""
    return ("auto", *MODULES)


def check(name: str) -> None:
    """UsageError unless ``name`` is a registered remover (cheap: nothing is imported)."""
    if name not in MODULES:
        raise UsageError(f"--remover must be one of {', '.join(choices())}, got {name!r}")


def get(name: str) -> "Remover":
    """The remover registered under ``name`` (UsageError for a name not in ``MODULES``)."""
    check(name)
    remover = importlib.import_module(MODULES[name]).REMOVER
    if remover.name != name:
        raise LookupError(f"{MODULES[name]}.REMOVER is named {remover.name!r}, registered as {name!r}")
    return remover
