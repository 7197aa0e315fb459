"""Structural checks of an untrusted model: names that are safe to reach generated code,
default-domain ops at a known opset, the checker and strict shape inference, tensor sizes,
constants that decode and are finite, and one onnxruntime run whose logits are finite.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from otbr_onnx.errors import UnreadableModelError, UnsupportedModelError, one_line
from otbr_onnx.load.limits import Limits


SUPPORTED_DOMAINS = ("", "ai.onnx")
# protobuf cannot serialise a message of 2 GiB or more, and onnxruntime and the checker are
# handed serialised bytes: a model whose inlined external data crosses this cannot be cleaned.
MAX_PROTO_BYTES = 2**31 - 1

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
# Readers for which an infinite constant is a legitimate bound, comparison or fill value
# (Clip(x, 0, inf), Where(mask, x, -inf) from masked_fill). Everywhere else an infinite value,
# and NaN anywhere, is a corrupt or hostile weight: cleaning it would write a model that
# outputs NaN. Add/Sub are deliberately absent: an infinite bias is the commonest way to
# poison logits, and image classifiers have no additive -inf attention masks.
INF_ALLOWED_READERS = frozenset({
    "Clip", "Min", "Max", "Where", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal",
})


# Characters refused in any name. onnx2torch turns node names into torch.fx module targets and
# fx pastes them, unescaped, into the Python source of the generated forward(): a node named
# 'relu")\nimport os; os.system(...)\n#' is code that runs when the model is called. Quotes,
# backslashes and line breaks are what such an injection needs; real exporters never emit them.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_UNSAFE_CHARS = frozenset("\"'\\")


def _unsafe_name(name: str) -> bool:
    return any(c in _UNSAFE_CHARS or unicodedata.category(c) in _UNSAFE_CATEGORIES for c in name)


def _graph_names(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """(what, name) for every node and tensor name, subgraphs (If / Loop bodies) included."""
    found = [("graph input", v.name) for v in graph.input] + [("graph output", v.name) for v in graph.output]
    found += [("value", v.name) for v in graph.value_info] + [("initializer", t.name) for t in graph.initializer]
    for node in graph.node:
        found += [("node", node.name), ("op type", node.op_type)]
        found += [("tensor", n) for n in (*node.input, *node.output)]
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                found += _graph_names(sub)
    return found


def check_names(graph: onnx.GraphProto) -> None:
    for what, name in _graph_names(graph):
        if not isinstance(name, str):  # protobuf hands back bytes for a string that is not UTF-8
            raise UnreadableModelError(f"{what} name {bytes(name)[:60]!r} is not valid UTF-8")
        if _unsafe_name(name):
            raise UnsupportedModelError(
                f"{what} name {name[:60]!r} contains a quote, backslash or control character; refused, "
                "since names reach generated PyTorch code"
            )


def check_size(proto: onnx.ModelProto) -> None:
    size = proto.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise UnsupportedModelError(
            f"the model with its external data is {size} bytes; models of 2 GiB or more cannot be cleaned"
        )


def check_structure(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The checker, then strict type and shape inference.

    A wrong-typed tensor (an int64 Conv weight), a Conv fed a rank-1 weight or an output declared
    (N, 3) that is really (N, 4, 8, 8) is not a valid model; caught here it is a clear refusal
    instead of a crash in onnxruntime, onnx2torch or PyTorch. Strict mode passes every model we
    tried from torch's legacy and dynamo exporters (ResNet, VGG, MobileNetV2, EfficientNet,
    ConvNeXt, ViT, Swin) and onnx's own test models.

    Returns the inferred model (shapes in ``value_info``) for the tensor-size check. Data
    propagation sizes shapes computed from constants (Shape -> Mul -> ConstantOfShape); where
    it fails on its own, the model is judged by plain inference, as before.
    """
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise UnreadableModelError(f"the ONNX checker rejects the model: {one_line(error, 'invalid model')}") from error
    errors = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError)
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except errors:
        pass
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except errors as error:
        raise UnreadableModelError(f"the model's types or shapes are inconsistent: {one_line(error, 'type error')}") from error


def tensor_sizes(graph: onnx.GraphProto) -> list[tuple[str, int]]:
    """(name, elements) of every tensor whose shape inference sized, If / Loop bodies included.

    Symbolic dims (the batch) count as 1. Sizes only known when the graph runs (a shape read
    from the data) are not bounded by this.
    """
    found = [(v.name, n) for v in (*graph.value_info, *graph.output) if (n := _declared_elements(v.type)) is not None]
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                found += tensor_sizes(sub)
    return found


def check_tensor_sizes(sizes: list[tuple[str, int]], limits: Limits) -> None:
    """Refuse a graph with a tensor above ``limits.max_tensor_elements`` (a memory bomb)."""
    for name, elements in sizes:
        if elements > limits.max_tensor_elements:
            raise UnsupportedModelError(
                f"tensor '{name}' would hold {elements} elements, above the --max-tensor-elements limit of "
                f"{limits.max_tensor_elements}; refused (a memory bomb, or raise the limit)"
            )


def _declared_elements(value_type: onnx.TypeProto) -> int | None:
    if not value_type.HasField("tensor_type") or not value_type.tensor_type.HasField("shape"):
        return None
    dims = value_type.tensor_type.shape.dim
    return math.prod(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)


def _constant_tensors(graph: onnx.GraphProto) -> list[tuple[str, TensorProto]]:
    """Every constant tensor of the main graph: initializers and ``Constant`` node values."""
    found = [(t.name, t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            found += [(node.output[0], a.t) for a in node.attribute if a.name == "value" and a.HasField("t")]
    return found


def check_constants(proto: onnx.ModelProto) -> None:
    """Every constant must decode to its declared shape, and float weights must be finite.

    Decoding one tensor at a time keeps the extra memory to the largest single tensor.
    """
    readers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    for name, tensor in _constant_tensors(proto.graph):
        try:
            array = numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError, OverflowError, MemoryError) as error:
            raise UnreadableModelError(
                f"tensor '{name}': data does not match its declared type and shape ({one_line(error, 'decode failed')})"
            ) from error
        if tensor.data_type not in FLOAT_TYPES or array.size == 0:
            continue
        # bfloat16 comes back as a numpy extension type; float16/32/64 are checked as they are,
        # so a large float64 is not mistaken for an overflow to inf.
        values = array if array.dtype.kind == "f" else array.astype(np.float32)
        _check_finite(name, values, readers.get(name, set()))


def _check_finite(name: str, array: np.ndarray, readers: set[str]) -> None:
    if np.isnan(array).any():
        raise UnsupportedModelError(f"weight '{name}' holds NaN (non-finite) values; refusing to clean it")
    if np.isinf(array).any() and not readers <= INF_ALLOWED_READERS:
        ops = ", ".join(sorted(readers))
        raise UnsupportedModelError(
            f"weight '{name}' (read by {ops}) holds infinite (non-finite) values; refusing to clean it"
        )


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in SUPPORTED_DOMAINS:
            return entry.version
    raise UnsupportedModelError("the model imports no default-domain ONNX opset")


def check_domains(proto: onnx.ModelProto) -> None:
    from converters.storage import qoperator_refusal

    for node in proto.graph.node:
        if node.domain not in SUPPORTED_DOMAINS:
            # onnxruntime's QOperator models use com.microsoft ops: say what the model is
            raise UnsupportedModelError(
                qoperator_refusal(proto)
                or f"node '{node.name}' uses op '{node.op_type}' of custom domain '{node.domain}', which cannot be converted"
            )
    known = onnx.defs.onnx_opset_version()
    version = default_opset(proto)
    if version > known:
        raise UnsupportedModelError(
            f"the model declares opset {version}; the installed onnx knows opsets up to {known}"
        )


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (they derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (RuntimeError, ValueError, TypeError, *found)


def check_runs(proto: onnx.ModelProto, input_name: str, shape: tuple[int, ...], output_name: str) -> int:
    """Run the model once in onnxruntime on one random image in [0, 1]; its logits must be finite.
    Returns the number of output columns (1: a binary classifier's single logit or probability).

    The checker and shape inference do not see everything onnxruntime rejects (a Conv whose
    weight expects 1 input channel fed an input declaring 9, an op it has no kernel for), and a
    finite but huge weight (1e38) overflows to infinite logits. Found here, each is a refusal
    naming the problem; found later, it was an internal error or a misleading parity message.
    One image keeps the cost to a session build and a single forward pass.
    """
    from converters import runtime  # the same quiet session and run as every later check

    image = runtime.random_inputs(shape, 1, seed=0)
    try:
        logits = np.asarray(runtime.run(runtime.session(proto), input_name, output_name, image))
    except ort_errors() as error:
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {one_line(error, type(error).__name__)}") from error
    # inspect, eval, verify and clean all load through here, so they refuse the same outputs
    if logits.dtype.kind != "f" or logits.ndim != 2 or logits.shape[1] < 1:
        raise UnsupportedModelError(
            f"the output has shape {tuple(logits.shape)}; expected class scores of shape (N, classes), "
            "or (N, 1) for a binary classifier's single logit"
            + ("" if logits.dtype.kind == "f" else f", got {logits.dtype} values")
        )
    if not np.isfinite(logits).all():
        raise UnsupportedModelError(
            f"output '{output_name}' is NaN or infinite on a random image in [0, 1]: the weights are corrupt or overflow"
        )
    return int(logits.shape[1])
