"""Finding the model's interface: its one float image input (shape resolved, size capped) and
the logits output, which must be computed from the image; whether it ends in a Softmax.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto

from otbr_onnx.errors import UnsupportedModelError, UsageError
from otbr_onnx.load.limits import Limits


def find_image_input(
    graph: onnx.GraphProto, override: tuple[int, ...] | None, limits: Limits
) -> tuple[str, tuple[int, ...]]:
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(v.name for v in inputs) or "none"
        raise UnsupportedModelError(
            f"expected exactly one image input, found {len(inputs)} ({names})"
        )
    value = inputs[0]
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        elem = TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "unknown"
        raise UnsupportedModelError(
            f"input '{value.name}' is {elem}; only float32 and float16 image inputs are supported"
        )
    if not tensor_type.HasField("shape"):
        declared: list[int | None] = [None] * len(override) if override else []
    else:
        # Paddle writes a dynamic dimension as -1 rather than leaving it symbolic
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value != -1 else None
                    for d in tensor_type.shape.dim]
    _check_declared_dims(value.name, declared)
    shape = _resolve_shape(value.name, declared, override)
    elements = math.prod(shape[1:])
    if elements > limits.max_noise_elements:
        raise UnsupportedModelError(
            f"input '{value.name}' has {elements} elements per image, above the --max-noise-elements limit "
            f"of {limits.max_noise_elements}"
        )
    return value.name, shape


def check_noise_budget(input_shape: tuple[int, ...], batch_size: int, limits: Limits) -> None:
    """Refuse a noise batch of ``batch_size`` images above ``limits.max_noise_elements``."""
    elements = batch_size * math.prod(input_shape[1:])
    if elements > limits.max_noise_elements:
        raise UnsupportedModelError(
            f"a noise batch of {batch_size} x {tuple(input_shape[1:])} is {elements} elements, "
            f"above the --max-noise-elements limit of {limits.max_noise_elements}; lower --batch-size"
        )


def _check_declared_dims(name: str, declared: list[int | None]) -> None:
    """Refuse dims no image batch can have (a fixed batch size is fine: see ``batch_plan``)."""
    bad = [axis for axis, dim in enumerate(declared) if dim is not None and dim <= 0]
    if bad:
        raise UnsupportedModelError(
            f"input '{name}' declares dimension(s) {bad} as {[declared[a] for a in bad]}; an image batch needs sizes > 0"
        )


def _resolve_shape(
    name: str, declared: list[int | None], override: tuple[int, ...] | None
) -> tuple[int, ...]:
    if len(declared) < 3 and override is None:
        raise UnsupportedModelError(
            f"input '{name}' has rank {len(declared)}; expected an image batch such as (N, C, H, W)"
        )
    if override is not None:
        if declared and len(override) != len(declared):
            raise UsageError(
                f"--input-shape has {len(override)} dimensions but input '{name}' has {len(declared)}"
            )
        for axis, (given, fixed) in enumerate(zip(override, declared)):
            if axis > 0 and fixed is not None and given != fixed:
                raise UsageError(
                    f"--input-shape gives {given} for dimension {axis} of '{name}', but the model fixes it to {fixed}"
                )
        return (1,) + tuple(override[1:])
    dynamic = [axis for axis, dim in enumerate(declared) if dim is None and axis > 0]
    if dynamic:
        raise UnsupportedModelError(
            f"input '{name}' has dynamic dimension(s) {dynamic} besides the batch; "
            "give the shape with --input-shape, e.g. --input-shape 1,3,224,224"
        )
    return (1,) + tuple(int(d) for d in declared[1:])


def find_output(graph: onnx.GraphProto, wanted: str | None) -> tuple[str, int]:
    names = [v.name for v in graph.output]
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"--output '{wanted}' is not a graph output (outputs: {', '.join(names)})")
        return wanted, names.index(wanted)
    if len(names) != 1:
        raise UsageError(
            f"the model has {len(names)} outputs ({', '.join(names)}); choose the logits with --output NAME"
        )
    return names[0], 0


def check_output_depends_on_input(graph: onnx.GraphProto, input_name: str, output_name: str) -> None:
    """The logits must be computed from the image: otherwise there is nothing to unlearn, and
    the converted module would not even take the image as its argument."""
    producers = {name: node for node in graph.node for name in node.output if name}
    pending, seen = [output_name], set()
    while pending:
        name = pending.pop()
        if name == input_name:
            return
        if name in seen or name not in producers:
            continue
        seen.add(name)
        pending.extend(n for n in producers[name].input if n)
    raise UnsupportedModelError(f"output '{output_name}' does not depend on the image input '{input_name}'")


def ends_in_softmax(graph: onnx.GraphProto, output_name: str) -> bool:
    """True when the output is a probability vector, so unlearning must work on its log."""
    for node in graph.node:
        if output_name in node.output:
            return node.op_type == "Softmax"
    return False
