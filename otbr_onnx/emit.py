"""Stage 5 (emit): write the new weights into the ORIGINAL graph (``converters.write_back``) and check
the written model in onnxruntime against the fused PyTorch module before anything is saved."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from converters import parity, runtime
from converters.parity import Parity
from converters.write_back import write_back
from otbr_onnx.errors import ParityError
from otbr_onnx.sizing import release_memory

if TYPE_CHECKING:
    from otbr_onnx.prepare import PreparedModel


def emit(prepared: "PreparedModel", weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, Parity]:
    """The cleaned ``ModelProto`` and its parity against the fused module; raises ``ParityError``
    (exit 4) when they disagree, so a bad model is never handed back."""
    loaded, inputs = prepared.loaded, prepared.parity_inputs
    # the fused module first and gone before the written model and its session exist: the three
    # together are three more copies of the weights at the run's peak
    fused = prepared.outputs(prepared.with_weights(weights), inputs)
    release_memory()
    cleaned = write_back(prepared.loaded.proto, weights)
    # the written graph as it is: a fixed batch runs at its own size (runtime.run chunks it)
    written = runtime.run(runtime.session(cleaned, prepared.providers), loaded.input_name, loaded.output_name, inputs)
    check = parity.compare(written, fused)
    if not check.ok:
        raise ParityError(
            f"the cleaned ONNX model disagrees with the fused PyTorch model "
            f"(max abs diff {check.max_abs:.3g} > tolerance {check.tolerance:.3g}); no output written"
        )
    return cleaned, check
