"""Write new weight values into the ORIGINAL graph (graph surgery), each into the storage it came
from (``converters.storage``: an initializer, a Constant node, the initializer behind an Identity
or Cast, a quantized initializer behind a DequantizeLinear).

Only tensor values change; nodes, names, value infos, opset imports, metadata, doc strings and
dynamic axes are the input file's own, because the output is a copy of the input ``ModelProto``
rather than a fresh export.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from converters import storage


def write_back(original: onnx.ModelProto, weights: dict[str, np.ndarray],
               sources: dict[str, storage.WeightSource] | None = None) -> onnx.ModelProto:
    """A copy of ``original`` whose weight slots named in ``weights`` hold the new values (float32,
    ONNX layout), stored in each storage's own dtype; see ``storage.write_back`` for quantized
    storages and what it reports."""
    sources = storage.resolve(original) if sources is None else sources
    return storage.write_back(original, weights, sources)[0]


def _stored(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        tensor = storage.constant_tensor(node) if node.op_type == "Constant" else None
        if tensor is not None:
            found[node.output[0]] = tensor
    return found


def changed_initializers(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Names of stored tensors (initializers, and Constant nodes by their output) whose values
    differ between two models with the same graph."""
    old, new = _stored(before), _stored(after)
    return [name for name, tensor in new.items()
            if name in old and not np.array_equal(numpy_helper.to_array(old[name]), numpy_helper.to_array(tensor))]
