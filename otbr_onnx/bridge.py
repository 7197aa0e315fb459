"""Where ``otbr_onnx`` calls the ONNX <-> PyTorch bridge (``converters``) and its errors become ours.

``converters`` raises its own ``ConversionError`` / ``ProviderError`` and knows nothing of this
package; every call that can raise one goes through here, so the user sees the documented
``UnsupportedModelError`` (exit 3) or ``UsageError`` (exit 2) with the same message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
from torch import fx

from converters import runtime, storage, to_torch
from converters.errors import ConversionError, ProviderError
from otbr_onnx.errors import UnsupportedModelError, UsageError


@contextmanager
def bridge_errors() -> Iterator[None]:
    """Re-raise the bridge's errors as the ``OtbrError`` the user acts on (message unchanged)."""
    try:
        yield
    except ConversionError as error:
        raise UnsupportedModelError(str(error)) from error
    except ProviderError as error:
        raise UsageError(str(error)) from error


def convert(model: onnx.ModelProto) -> fx.GraphModule:
    with bridge_errors():
        return to_torch.convert(model)


def weight_refs(module: fx.GraphModule, model: onnx.ModelProto, layers: list) -> dict[str, to_torch.TorchTensorRef]:
    with bridge_errors():
        return to_torch.weight_refs(module, model, layers)


def batchnorm_refs(module: fx.GraphModule, model: onnx.ModelProto, slots) -> dict[str, to_torch.TorchTensorRef]:
    with bridge_errors():
        return to_torch.batchnorm_refs(module, model, slots)


def module_names(model: onnx.ModelProto) -> list[str]:
    """The submodule ``convert`` gives each node of ``model``, in node order."""
    with bridge_errors():
        return to_torch.module_names(model)


def check_convertible(model: onnx.ModelProto) -> None:
    with bridge_errors():
        to_torch.check_convertible(model)


def providers(name: str) -> list[str]:
    with bridge_errors():
        return runtime.providers(name)


def weight_storage(model: onnx.ModelProto) -> storage.WeightStorage:
    """Where each weight slot of ``model`` is stored, and the float32 working copy."""
    with bridge_errors():
        return storage.analyse(model)
