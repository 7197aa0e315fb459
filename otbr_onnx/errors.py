"""Errors the tool reports to its user, each tied to a documented exit code.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; anything
else escaping the pipeline is a bug and is reported as an internal error (exit 1).
"""


# one formatter for both packages; converters cannot import this module, so it lives there
from converters.errors import MAX_MESSAGE_CHARS, one_line  # noqa: F401


class OtbrError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1


class UsageError(OtbrError):
    """Bad options or an unusable path (exit 2)."""

    exit_code = 2


class UnreadableModelError(OtbrError):
    """The file is not a valid ONNX model (exit 2)."""

    exit_code = 2


class UnsupportedModelError(OtbrError):
    """A valid ONNX model that this tool refuses to clean (exit 3)."""

    exit_code = 3


class FidelityBudgetError(UnsupportedModelError):
    """Even the gentlest cleaning changes the model beyond the user's budget: refused (exit 3)."""


class ParityError(OtbrError):
    """onnxruntime and PyTorch disagree beyond tolerance (exit 4)."""

    exit_code = 4
