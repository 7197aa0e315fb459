"""Static shapes of every value of a model, from ONNX shape inference and, where inference gives
up, from one onnxruntime run. The one place the tool asks what shape a tensor has beyond its
interface: ``LoadedModel.shapes`` computes it once per model, the channel-tie analysis reads it.

Tensor dims and dtypes are read from the protos (``TensorProto.dims``, ``ValueInfoProto``
types); no initializer is decoded here.
"""

from __future__ import annotations

import numpy as np
import onnx

Shapes = dict[str, list[int]]  # value name -> dims; -1 where a dim is unknown


def static_shapes(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...], batch: int = 2) -> Shapes:
    """Shapes of every value with the input fixed to ``input_shape`` and batch 2 (or ``batch``:
    a model that only runs at its own fixed batch size is analysed at that size).

    Batch 2 rather than 1 keeps a reshape that merges the batch into another axis from
    looking like one that keeps it. ONNX shape inference comes first; where it leaves a node
    output unknown (the legacy exporter computes ``Reshape`` targets through
    ``Shape -> Gather -> Concat`` chains that data propagation does not always follow), the
    model is run once in onnxruntime and the real shapes fill the gaps. An unknown shape
    pins every layer whose channels pass through it, so each shape recovered here is a tie
    that can be honoured instead of pinned.
    """
    shapes = _inferred_shapes(model, input_name, input_shape, batch)
    unknown = [name for node in model.graph.node for name in node.output
               if name and not fully_known(shapes.get(name))]
    if unknown:
        shapes.update(_executed_shapes(model, input_name, input_shape, unknown, batch))
    return shapes


def fully_known(dims: list[int] | None) -> bool:
    return dims is not None and all(d > 0 for d in dims)


def _with_batch(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...], batch: int) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in (batch,) + tuple(input_shape[1:]):
                dims.add().dim_value = int(size)
    return probe


def _inferred_shapes(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...], batch: int) -> Shapes:
    probe = _with_batch(model, input_name, input_shape, batch)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort; unknown shapes pin
        inferred = probe
    shapes: Shapes = {}
    graph = inferred.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
            shapes[value.name] = dims
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _executed_shapes(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...],
                     names: list[str], batch: int) -> Shapes:
    """Shapes of ``names`` from one onnxruntime run on a batch of ``batch`` constant images.

    A value onnxruntime cannot expose (a sequence, an optional) or a run that fails leaves the
    shape unknown: the walk then pins what flows through it, which is always safe.
    """
    from converters import runtime  # onnxruntime only for models whose shapes inference misses

    probe = _with_batch(model, input_name, input_shape, batch)
    declared = {v.name for v in probe.graph.output}
    wanted = [name for name in dict.fromkeys(names) if name not in declared]
    probe.graph.output.extend([onnx.ValueInfoProto(name=name) for name in wanted])
    images = np.full((batch,) + tuple(input_shape[1:]), 0.5, dtype=np.float32)
    try:
        session = runtime.session(probe)
        outputs = [o.name for o in session.get_outputs()]
        values = runtime.run_outputs(session, outputs, {input_name: images})
    except Exception:  # noqa: BLE001 - best effort, as for shape inference
        return {}
    wanted_set = set(names)
    return {name: list(np.shape(value)) for name, value in zip(outputs, values)
            if name in wanted_set and isinstance(value, np.ndarray)}
