"""Write new weight values into the ORIGINAL graph by initializer name (graph surgery).

Only the ``raw_data`` of the named initializers changes; nodes, names, value infos, opset
imports, metadata, doc strings and dynamic axes are the input file's own, because the output
is a copy of the input ``ModelProto`` rather than a fresh export.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


_VALUE_FIELDS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data")


def write_back(original: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``original`` whose initializers named in ``weights`` hold the new values.

    Each new array must match the initializer's shape; it is stored as ``raw_data`` in the
    initializer's own dtype, and every other field of the tensor is kept as it was.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    by_name = {tensor.name: tensor for tensor in model.graph.initializer}
    missing = sorted(set(weights) - set(by_name))
    if missing:
        raise KeyError(f"no initializer named {missing[0]!r}")
    for name, value in weights.items():
        tensor = by_name[name]
        shape = tuple(tensor.dims)  # dims and dtype from the proto: the old values are not decoded
        if tuple(value.shape) != shape:
            raise ValueError(f"initializer {name!r}: new shape {value.shape} != {shape}")
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        raw = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype, copy=False)), name).raw_data
        for field in _VALUE_FIELDS:  # keep name, dims, dtype, doc string: only the values change
            tensor.ClearField(field)
        tensor.raw_data = raw
    return model


def changed_initializers(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Names of initializers whose values differ between two models with the same initializers."""
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    return [t.name for t in after.graph.initializer if not np.array_equal(old[t.name], numpy_helper.to_array(t))]
