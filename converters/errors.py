"""The bridge's own errors. ``converters`` knows nothing of ``otbr_onnx``: the package that calls
it (``otbr_onnx.bridge``) maps these onto the errors it reports to its user."""

MAX_MESSAGE_CHARS = 300


def one_line(error: BaseException, fallback: str = "", limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """The error's text on one line (library messages often span several), capped at ``limit``."""
    text = " ".join(str(error).split()) or fallback
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


class BridgeError(Exception):
    """Base class of everything ``converters`` raises on purpose."""


class ConversionError(BridgeError):
    """The model cannot be brought to PyTorch faithfully: an op without a converter, a converter
    failure, or a weight that cannot be located in the converted module."""


class ProviderError(BridgeError):
    """The requested onnxruntime execution provider is not available here."""
