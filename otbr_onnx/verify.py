"""``verify``: prove a cleaned file is the original graph with only weight values changed.

Every protobuf field of the two models is compared recursively, except the values of
initializers (``raw_data`` and the typed ``*_data`` lists) and of the Constant nodes that hold
weights; the first difference found is reported by its field path. Weights are found through
their storages (``converters.storage``: initializer, Constant node, behind Identity / Cast /
DequantizeLinear), as ``clean`` finds them. ``clean`` only ever changes the float weights and biases of weight
layers (Conv, Gemm, MatMul), so a changed value of any other initializer (an int64 Gather index
that reorders the classes, a Reshape shape, a normalisation constant) is a graph difference
too. Then each changed initializer's movement is measured, and both models are run in
onnxruntime on the same random inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from converters import runtime, storage
from converters.errors import BridgeError
from converters.single_score import as_class_scores
from otbr_onnx.errors import UnsupportedModelError
from otbr_onnx.layers import find_weight_layers

if TYPE_CHECKING:
    from otbr_onnx.options import CleanOptions

VALUE_FIELDS = {"raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data"}


@dataclass
class Verification:
    same_graph: bool
    first_difference: str | None
    moved: dict[str, dict[str, float]] = field(default_factory=dict)  # initializer -> movement
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def first_difference(a: Message, b: Message, path: str = "model") -> str | None:
    """Path of the first field that differs, ignoring initializer values; None if none does."""
    in_tensor = path.split(".")[-1].startswith("initializer")
    fields = {f.name: f for f, _ in a.ListFields()} | {f.name: f for f, _ in b.ListFields()}
    for name in sorted(fields):
        if in_tensor and name in VALUE_FIELDS:
            continue
        descriptor = fields[name]
        left, right = getattr(a, name), getattr(b, name)
        if _is_repeated(descriptor):
            if len(left) != len(right):
                return f"{path}.{name} (count {len(left)} vs {len(right)})"
            for index, (x, y) in enumerate(zip(left, right)):
                found = _compare(x, y, f"{path}.{name}[{index}]")
                if found:
                    return found
        else:
            found = _compare(left, right, f"{path}.{name}")
            if found:
                return found
    return None


def _is_repeated(descriptor) -> bool:
    # protobuf >= 5.28 has is_repeated; older releases only the label enum
    if hasattr(descriptor, "is_repeated"):
        return bool(descriptor.is_repeated)
    return descriptor.label == descriptor.LABEL_REPEATED


def _compare(x, y, path: str) -> str | None:
    if isinstance(x, Message):
        return first_difference(x, y, path)
    return None if x == y else path


def weight_slots(model: onnx.ModelProto) -> dict[str, storage.WeightSource]:
    """Slot -> storage of the weights and biases ``clean`` may change in ``model``."""
    try:
        store = storage.analyse(model)
        layers, _ = find_weight_layers(store.working, store.shared)
    except (UnsupportedModelError, BridgeError):  # no weights clean could change
        return {}
    names = {name for layer in layers for name in (layer.weight, layer.bias) if name}
    return {slot: source for slot, source in store.sources.items() if slot in names}


def weight_names(model: onnx.ModelProto) -> set[str]:
    """The stored tensors ``clean`` may change: the initializers and Constant outputs holding the
    weight layers' weights and biases, and the scales of quantized ones (re-derived where the new
    values do not fit)."""
    found = set()
    for source in weight_slots(model).values():
        found.add(source.stored.name)
        if source.scale is not None:
            found.add(source.scale.name)
    return found


def _without_values(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy whose Constant nodes among ``names`` hold no values (their kind, name, dims and
    dtype still count), so a changed Constant weight is not a graph difference."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names:
            tensor = storage.constant_tensor(node)
            if tensor is not None:
                for name in VALUE_FIELDS:
                    tensor.ClearField(name)
    return copy


def graph_difference(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """The first difference outside the values of weight storages, or None."""
    allowed = weight_names(before)
    return (first_difference(_without_values(before, allowed), _without_values(after, allowed))
            or changed_non_weight(before, after, allowed))


def changed_non_weight(before: onnx.ModelProto, after: onnx.ModelProto, allowed: set[str] | None = None) -> str | None:
    """Field path of the first initializer outside ``weight_names`` whose values differ, or None.

    Called once ``first_difference`` found none, so both models have the same initializers in
    the same order with the same names, types and dims.
    """
    allowed = weight_names(before) if allowed is None else allowed
    for index, (a, b) in enumerate(zip(before.graph.initializer, after.graph.initializer)):
        if a.name in allowed or _same(numpy_helper.to_array(a), numpy_helper.to_array(b)):
            continue
        return (f"model.graph.initializer[{index}] values ('{a.name}', not a weight or bias of a Conv, Gemm or "
                "MatMul layer: clean never changes it)")
    return None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values; NaN equals NaN for floats (isnan is undefined for strings and bools)."""
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc"))


def movement(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, dict[str, float]]:
    """For each changed weight storage: max absolute change and L2 change relative to its norm,
    of the float values the layer reads (dequantized, float16 widened), keyed by the stored tensor."""
    sources = weight_slots(before)
    old, new = storage.effective(before, sources), storage.effective(after, sources)
    moved = {}
    for slot, source in sources.items():
        a, b = old[slot].astype(np.float64), new[slot].astype(np.float64)
        if _same(a, b) or source.stored.name in moved:
            continue
        diff = b - a
        norm = float(np.linalg.norm(a))
        moved[source.stored.name] = {
            "max_abs": float(np.max(np.abs(diff))),
            "relative_l2": float(np.linalg.norm(diff) / norm) if norm > 0 else float("inf"),
        }
    return moved


def verify(original: onnx.ModelProto, cleaned: onnx.ModelProto, input_name: str,
           input_shape: tuple[int, ...], samples: int = 64, seed: int = 0,
           input_range: tuple[float, float] = (0.0, 1.0)) -> Verification:
    """Compare structure, weight movement and outputs of ``cleaned`` against ``original``."""
    difference = graph_difference(original, cleaned)
    result = Verification(same_graph=difference is None, first_difference=difference)
    if difference is not None:
        return result
    result.moved = movement(original, cleaned)
    x = runtime.random_inputs(input_shape, samples, seed, *input_range)
    out_name = original.graph.output[0].name
    a = runtime.run(runtime.session(original), input_name, out_name, x)
    b = runtime.run(runtime.session(cleaned), input_name, out_name, x)
    # one logit or probability: agreement is on the side of the threshold
    flat_a = as_class_scores(a.reshape(len(a), -1), original.graph, out_name)
    flat_b = as_class_scores(b.reshape(len(b), -1), original.graph, out_name)
    result.top1_agreement = float(np.mean(flat_a.argmax(1) == flat_b.argmax(1)))
    result.max_abs_logit_diff = float(np.max(np.abs(flat_a - flat_b)))
    return result


def verify_files(original: Path, cleaned: Path, options: "CleanOptions", samples: int = 64,
                 with_scan: bool = False) -> tuple[Verification, dict | None]:
    """``otbr-onnx verify``: both files loaded under ``options`` (input shape, limits), the
    user's ``options.data.path`` read first when given (fail fast, before the scans), the
    comparison, and with ``with_scan`` both models scanned under the same ``options``
    (``scan_both``)."""
    from otbr_onnx.data import read_data
    from otbr_onnx.load import load_model

    before = load_model(original, options.interface.input_shape, limits=options.limits)
    after = load_model(cleaned, options.interface.input_shape, limits=options.limits)
    if options.data.path is not None:
        read_data(options, before.input_shape)
    result = verify(before.proto, after.proto, before.input_name, before.input_shape, samples)
    return result, scan_both(before.proto, after.proto, options) if with_scan else None


def scan_both(original: onnx.ModelProto, cleaned: onnx.ModelProto, options: "CleanOptions") -> dict:
    """Each model's scan section, both scanned with every option the user gave (limits included)."""
    from otbr_onnx import pipeline

    return {"original": pipeline.scan(original, options).report["scan"],
            "cleaned": pipeline.scan(cleaned, options).report["scan"]}
