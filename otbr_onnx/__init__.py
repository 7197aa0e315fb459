"""otbr-onnx: data-free backdoor removal for ONNX image classifiers (OTBR, AAAI 2025)."""

from otbr_onnx.errors import OtbrError, ParityError, UnreadableModelError, UnsupportedModelError, UsageError
from otbr_onnx.pipeline import CleanOptions, CleanResult, clean

__all__ = [
    "CleanOptions",
    "CleanResult",
    "OtbrError",
    "ParityError",
    "UnreadableModelError",
    "UnsupportedModelError",
    "UsageError",
    "clean",
]
__version__ = "0.1.0"
