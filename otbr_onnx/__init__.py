"""otbr-onnx: data-free backdoor removal for ONNX image classifiers (OTBR, AAAI 2025).

    >>> from otbr_onnx import clean, CleanOptions
    >>> result = clean("suspicious.onnx", CleanOptions())  # gamma chosen on synthesised probes
    >>> onnx.save(result.model, "cleaned.onnx"); result.report["parity"]

The pipeline is imported on first use, so ``converters`` (which this package's pipeline
uses) can import the errors below without a cycle.
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
