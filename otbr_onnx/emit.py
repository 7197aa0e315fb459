"""Stage 5 (emit): write the new weights into the ORIGINAL graph (``converters.write_back``) and check
the written model in onnxruntime against the fused PyTorch module before anything is saved."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from converters import parity, runtime, storage
from converters.parity import Parity
from converters.storage import WriteNotes
from converters.to_torch import run_torch
from otbr_onnx.errors import ParityError

if TYPE_CHECKING:
    from otbr_onnx.prepare import PreparedModel


# The written model of a float16 / int8 model may differ from the fused float32 module by its own
# rounding: parity allows this many times the gap measured on the model before cleaning.
PRECISION_GAP_FACTOR = 4.0


def emit(prepared: "PreparedModel", weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, Parity, WriteNotes]:
    """The cleaned ``ModelProto``, its parity against the fused module and what write-back had to
    do (clipping, new weight scales); raises ``ParityError`` (exit 4) when they disagree, so a bad
    model is never handed back.

    Weights go back into the storage they came from (``converters.storage.write_back``); the
    fused module is run with the values as stored (float16-rounded, requantized), so parity
    measures the graph, not the storage's rounding.
    """
    loaded, inputs = prepared.loaded, prepared.parity_inputs
    sources = loaded.storage.sources
    cleaned, notes = storage.write_back(loaded.proto, weights, sources)
    stored = storage.effective(cleaned, {slot: sources[slot] for slot in prepared.refs})
    check = parity.compare(
        runtime.run(runtime.session(cleaned, prepared.providers), loaded.input_name, loaded.output_name, inputs),
        run_torch(prepared.with_weights(stored), inputs, loaded.output_index),
        allowance=PRECISION_GAP_FACTOR * prepared.precision_gap,
    )
    if not check.ok:
        raise ParityError(
            f"the cleaned ONNX model disagrees with the fused PyTorch model "
            f"(max abs diff {check.max_abs:.3g} > tolerance {check.tolerance:.3g}); no output written"
        )
    return cleaned, check, notes
