"""Stage 5 (emit): write the new weights into the ORIGINAL graph (``converters.write_back``) and check
the written model in onnxruntime against the fused PyTorch module before anything is saved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from converters import parity, runtime, storage
from converters.parity import Parity
from converters.storage import WriteNotes
from otbr_onnx.errors import ParityError
from otbr_onnx.sizing import release_memory

if TYPE_CHECKING:
    from otbr_onnx.prepare import PreparedModel


# The written model of a float16 / int8 model differs from the fused float32 module by its own
# rounding. Parity allows twice the gap measured between the model and its float32 working copy
# before cleaning (activation quantization, float16 compute where the provider has it), plus a
# relative margin for the weights' own rounding: 8 units in the last place of the format, and
# 1 % for int8 (requantized weights round differently from the original ones).
PRECISION_GAP_FACTOR = 2.0
RELATIVE_MARGIN = {"float32": 0.0, "float16": 8 * 2.0**-10, "bfloat16": 8 * 2.0**-7, "int8": 1e-2}


@dataclass
class Written:
    """The emit stage's result: the cleaned model and the checks of it."""

    model: onnx.ModelProto
    parity: Parity  # the written model in onnxruntime against the fused module
    notes: WriteNotes  # what write-back had to do (clipping, new weight scales)
    float_copy: Parity | None  # a float16 / int8 model's float32 copy against the fused module

    def as_dict(self) -> dict:
        """The written model's parities (the report's ``parity`` beside the conversion's)."""
        return {"output": self.parity.as_dict(),
                **({"float_copy": self.float_copy.as_dict()} if self.float_copy is not None else {})}


def emit(prepared: "PreparedModel", weights: dict[str, np.ndarray]) -> Written:
    """The cleaned ``ModelProto``, its parity against the fused module, what write-back had to
    do (clipping, new weight scales) and, for a float16 / int8 model, the parity of its float32
    copy (``_float_copy_parity``); raises ``ParityError`` (exit 4) when they disagree, so a bad
    model is never handed back.

    Weights go back into the storage they came from (``converters.storage.write_back``); the
    fused module is run with the values as stored (float16-rounded, requantized), so parity
    measures the graph, not the storage's rounding.
    """
    loaded, inputs = prepared.loaded, prepared.parity_inputs
    sources = loaded.storage.writable
    cleaned, notes = storage.write_back(loaded.proto, weights, sources)
    stored = storage.effective(cleaned, {slot: sources[slot] for slot in prepared.refs})
    # the fused module's outputs, and the module gone before the written model's session exists:
    # the copies of the weights together make the run's peak
    fused = prepared.outputs(prepared.with_weights(stored), inputs)
    release_memory()
    # the written graph as it is: a fixed batch runs at its own size (runtime.run chunks it)
    written = loaded.class_scores(
        runtime.run(runtime.session(cleaned, prepared.providers), loaded.input_name, loaded.output_name, inputs))
    check = parity.compare(written, fused, allowance=allowance(prepared, written))
    float_copy = _float_copy_parity(prepared, cleaned, fused)
    if float_copy is not None and not float_copy.ok:
        raise ParityError(
            f"the float32 copy of the cleaned model disagrees with the fused PyTorch model (max abs diff "
            f"{float_copy.max_abs:.3g} > tolerance {float_copy.tolerance:.3g}): the weights were not stored as "
            "computed; no output written"
        )
    if not check.ok:
        raise ParityError(
            f"the cleaned ONNX model disagrees with the fused PyTorch model "
            f"(max abs diff {check.max_abs:.3g} > tolerance {check.tolerance:.3g}); no output written"
        )
    return Written(cleaned, check, notes, float_copy)


def allowance(prepared: "PreparedModel", reference: np.ndarray) -> float:
    """The part of the parity tolerance owed to the model's reduced precision (0 for float32)."""
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    precision = prepared.loaded.storage.precision
    return PRECISION_GAP_FACTOR * prepared.precision_gap + RELATIVE_MARGIN[precision] * scale


def _float_copy_parity(prepared: "PreparedModel", cleaned: onnx.ModelProto, fused: np.ndarray) -> Parity | None:
    """For a float16 / int8 model: the cleaned model's float32 working copy against the fused
    module at float32 tolerance. The weights as stored must be exactly what the module ran."""
    loaded = prepared.loaded
    if not loaded.storage.lossy:
        return None
    copy = storage.working_model(cleaned)
    session = runtime.session(copy, prepared.providers)
    floats = runtime.run(session, loaded.input_name, loaded.output_name, prepared.parity_inputs)
    return parity.compare(loaded.class_scores(floats), fused)
