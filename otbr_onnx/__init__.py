"""otbr-onnx: data-free backdoor removal for ONNX image classifiers (OTBR, AAAI 2025).

    >>> from otbr_onnx import clean, CleanOptions
    >>> result = clean("suspicious.onnx", CleanOptions())  # gamma chosen on synthesised probes
    >>> onnx.save(result.model, "cleaned.onnx"); result.report["parity"]

The pipeline (``clean``, ``CleanOptions``, ``CleanResult``) is imported on first use, for
import speed only: it pulls in torch, onnx2torch and POT (about 3 s), which ``otbr-onnx
--help``, the CLI's error handling and ``from otbr_onnx.errors import ...`` do not need.
There is no import cycle to break (``tests/test_architecture.py`` checks that).
"""

from otbr_onnx.errors import (
    FidelityBudgetError,
    OtbrError,
    ParityError,
    UnreadableModelError,
    UnsupportedModelError,
    UsageError,
)

__all__ = [
    "CleanOptions",
    "CleanResult",
    "FidelityBudgetError",
    "OtbrError",
    "ParityError",
    "UnreadableModelError",
    "UnsupportedModelError",
    "UsageError",
    "clean",
]
__version__ = "0.1.0"
_PIPELINE = ("CleanOptions", "CleanResult", "clean")


def __getattr__(name: str):
    if name in _PIPELINE:
        from otbr_onnx import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'otbr_onnx' has no attribute {name!r}")
