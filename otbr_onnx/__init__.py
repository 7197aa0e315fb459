"""otbr-onnx: data-free backdoor removal for ONNX image classifiers (OTBR, AAAI 2025).

    >>> from otbr_onnx import clean, scan, CleanOptions
    >>> scan("suspicious.onnx").result.suspected    # classes a backdoor is suspected to serve
    >>> result = clean("suspicious.onnx", CleanOptions())  # scan -> locate -> remove -> rescan
    >>> result.changed, result.report["verdict"]
    >>> clean("suspicious.onnx", CleanOptions().with_(removal={"prune_ratio": 0.05}))  # options by group

The pipeline (``scan``, ``clean`` and their option and result types) is imported on first use, for
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
    "DataOptions",
    "Experiment",
    "InterfaceOptions",
    "RemovalOptions",
    "RunOptions",
    "ScanOptions",
    "ScanReport",
    "FidelityBudgetError",
    "OtbrError",
    "ParityError",
    "UnreadableModelError",
    "UnsupportedModelError",
    "UsageError",
    "clean",
    "scan",
]
__version__ = "0.1.0"
_PIPELINE = ("CleanOptions", "CleanResult", "DataOptions", "Experiment", "InterfaceOptions", "RemovalOptions",
             "RunOptions", "ScanOptions", "ScanReport", "clean", "scan")


def __getattr__(name: str):
    if name in _PIPELINE:
        from otbr_onnx import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'otbr_onnx' has no attribute {name!r}")
