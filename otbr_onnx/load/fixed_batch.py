"""The batch plan: a model with a fixed batch size is fed through a working copy with a dynamic
batch where the graph allows it, and otherwise at its own batch size (``sizing.BatchPlan``).
"""

from __future__ import annotations

import numpy as np
import onnx

from otbr_onnx.errors import one_line
from otbr_onnx.load.checks import ort_errors
from otbr_onnx.sizing import BatchPlan


def declared_batch(proto: onnx.ModelProto, input_name: str) -> int | None:
    """The fixed batch size ``input_name`` declares; None when dynamic (symbolic, absent or -1)."""
    for value in proto.graph.input:
        if value.name == input_name and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def batch_plan(proto: onnx.ModelProto, input_name: str, shape: tuple[int, ...],
               output_name: str) -> tuple[onnx.ModelProto | None, BatchPlan]:
    """How the pipeline feeds a fixed batch: through a copy whose batch dim is dynamic when that
    copy passes strict shape inference and gives, at batch 2, the model's own outputs; else at
    the model's own batch size. A dynamic model needs neither (None, "dynamic")."""
    fixed = declared_batch(proto, input_name)
    if fixed is None:
        return None, BatchPlan()
    working = _dynamic_batch_copy(proto, input_name, fixed)
    reason = _dynamic_copy_problem(proto, working, input_name, shape, output_name)
    if reason is None:
        return working, BatchPlan(fixed, "made dynamic")
    return None, BatchPlan(fixed, "fixed", reason)


def _dynamic_batch_copy(proto: onnx.ModelProto, input_name: str, fixed: int) -> onnx.ModelProto:
    """A copy with the input's batch dim, and each output's first dim of the same size, symbolic;
    intermediate shapes (``value_info``) are dropped, so inference derives them anew."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.value_info[:]
    inputs = [v for v in copy.graph.input if v.name == input_name]
    for value in (*inputs, *copy.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].dim_param = "otbr_batch"  # setting the oneof clears dim_value
    return copy


def _dynamic_copy_problem(proto: onnx.ModelProto, working: onnx.ModelProto, input_name: str,
                          shape: tuple[int, ...], output_name: str) -> str | None:
    """Why ``working`` cannot stand in for ``proto`` at any batch size, or None when it can."""
    from converters import parity, runtime

    errors = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError)
    try:
        onnx.shape_inference.infer_shapes(working, check_type=True, strict_mode=True)
    except errors as error:
        return f"shape inference fails with a dynamic batch: {one_line(error, 'inference error')}"
    images = runtime.random_inputs(shape, 2, seed=1)
    try:
        got = np.asarray(runtime.run(runtime.session(working), input_name, output_name, images))
    except ort_errors() as error:
        return f"onnxruntime cannot run it at batch 2: {one_line(error, type(error).__name__)}"
    expected = np.asarray(runtime.run(runtime.session(proto), input_name, output_name, images))
    if got.shape != expected.shape:
        return f"at batch 2 the output has shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    if not parity.compare(expected, got).ok:
        return "at batch 2 the outputs differ from the model's own batch (the graph mixes images)"
    return None
