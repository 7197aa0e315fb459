"""Stage 1: read an untrusted ONNX file, validate it and find the image input and logits output.

Nothing here trusts the file: external-data paths are resolved against the model's own folder
and refused when they leave it, sizes are capped before anything large is allocated, and every
failure becomes an ``OtbrError`` with a one-line message.

What a model must pass, in order (exit 2 = not a valid model, 3 = valid but refused):
names are UTF-8 (2) and free of quotes, backslashes and control characters, which would reach
generated PyTorch code (3); default-domain ops at a known opset (3); the ONNX checker and strict
type/shape inference (2); every constant decodes to its declared shape (2) and holds no NaN,
nor +-Inf outside bound/mask uses (3); one float image input of a capped size (3); logits
computed from that input (3); and one onnxruntime run on a random image (3), whose logits must
be finite.

A fixed batch size is accepted: ``batch_plan`` makes a working copy with a dynamic batch where
the graph allows it, and otherwise the model runs at its own batch size (``sizing.BatchPlan``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, numpy_helper

from converters.single_score import single_score_kind, two_class_graph
from otbr_onnx.errors import OtbrError, UnreadableModelError, UnsupportedModelError, UsageError, one_line
from otbr_onnx.files import open_regular
from otbr_onnx.sizing import BatchPlan

if TYPE_CHECKING:
    from converters.storage import WeightStorage

SUPPORTED_DOMAINS = ("", "ai.onnx")
MAX_FILE_BYTES = 2 * 1024**3
MAX_NODES = 100_000
MAX_NOISE_ELEMENTS = 64 * 1024**2  # float32 elements of one noise batch (256 MiB)
# Elements of any one intermediate tensor that shape inference can size (batch dims as 1): a
# 10 KB model with ConstantOfShape [16000, 16000] on the logits path otherwise allocates 1 GiB
# per run (3.8 GB peak in clean). The largest activation of common classifiers is ~1e6 per
# image (ResNet at 224: 64 x 112 x 112), so 64 Mi elements (256 MiB of float32) is generous.
MAX_TENSOR_ELEMENTS = 64 * 1024**2
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


@dataclass(frozen=True)
class Limits:
    """Caps that keep a hostile file from exhausting the machine."""

    max_file_bytes: int = MAX_FILE_BYTES  # also bounds what an npz (--data, --calibration) declares
    max_nodes: int = MAX_NODES
    max_noise_elements: int = MAX_NOISE_ELEMENTS
    max_tensor_elements: int = MAX_TENSOR_ELEMENTS


@dataclass(frozen=True)
class LoadedModel:
    """A validated model and what the pipeline needs to know about its interface.

    ``proto`` is the model exactly as read (external data inlined): write-back edits a copy
    of it, so nothing shape inference adds ever reaches the output file.
    """

    path: Path | None
    proto: onnx.ModelProto
    sha256: str
    input_name: str
    input_shape: tuple[int, ...]  # resolved, batch dimension included (value used for checks)
    output_name: str
    output_index: int
    output_is_probability: bool
    opset: int
    # A fixed-batch model's copy with the batch made dynamic (shape fields only), which is
    # converted to PyTorch; None: ``proto`` itself. Never written anywhere.
    working_proto: onnx.ModelProto | None = None
    batch: BatchPlan = BatchPlan()
    # A binary classifier with one output column: "logit" or "probability" (after a Sigmoid);
    # the working copy answers two class scores (``converters.single_score``). None: (N, classes).
    single_score: str | None = None

    def class_scores(self, values: np.ndarray) -> np.ndarray:
        """What onnxruntime returns for the model as given (or as written), as the working copy's
        class scores: the same array, or a single column widened to two."""
        if self.single_score is None:
            return values
        from converters.single_score import two_class_scores

        return two_class_scores(values, self.single_score)

    @functools.cached_property
    def shapes(self) -> dict[str, list[int]]:
        """Static shape of every value at batch 2, or at the model's own batch where it is fixed
        (``otbr_onnx.shapes.static_shapes``), computed on first use and then shared by every
        stage that asks."""
        from otbr_onnx.shapes import static_shapes

        return static_shapes(self.working, self.input_name, self.input_shape, self.batch.exact or 2)

    @functools.cached_property
    def storage(self) -> "WeightStorage":
        """Where each weight is stored (initializer, Constant node, behind Identity / Cast /
        DequantizeLinear) and the float32 working copy built from it; see ``converters.storage``.
        Analysed on the dynamic-batch copy where there is one: the two copies touch disjoint
        fields (shapes; weight storage), so the float32 copy has both."""
        from otbr_onnx.bridge import weight_storage

        return weight_storage(self.working_proto if self.working_proto is not None else self.proto)

    @property
    def working(self) -> onnx.ModelProto:
        """The copy every stage but write-back reads: each weight slot a plain float32
        initializer, a fixed batch made dynamic where the graph allows it (``batch_plan``), same
        node names. ``proto`` stays the model as read."""
        return self.storage.working


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    output_name: str | None = None,
    limits: Limits = Limits(),
) -> LoadedModel:
    """Read, check and describe the model at ``path``."""
    path = Path(path)
    with _loader_errors(str(path)):
        data = _read_bytes(path, limits)
        proto = _parse(data, path)
        _check_names(proto.graph)  # first: later messages quote names, and must stay one line
        _inline_external_data(proto, path.parent, limits)
        model = describe_model(proto, input_shape, output_name, limits)
    return LoadedModel(path=path, sha256=hashlib.sha256(data).hexdigest(), **model)


@contextmanager
def _loader_errors(source: str) -> Iterator[None]:
    """Every failure while reading an untrusted model is the model's fault, never a bug of ours.

    onnx, protobuf and numpy raise their own exception types for hostile files (onnx's
    ValidationError for hard-linked external data, RecursionError for nesting, MemoryError for
    declared sizes); the specific checks below catch what they know, and this maps the rest to a
    refusal (exit 2, or 3 for memory) instead of an internal error (exit 1).
    """
    try:
        yield
    except OtbrError:
        raise
    except MemoryError as error:
        raise UnsupportedModelError(f"{source}: loading the model needs more memory than is available; refused") from error
    except Exception as error:  # noqa: BLE001 - the trust boundary: see the docstring
        raise UnreadableModelError(f"{source}: cannot load: {type(error).__name__}: {one_line(error, 'failed')}") from error


def load_proto(
    proto: onnx.ModelProto,
    input_shape: tuple[int, ...] | None = None,
    output_name: str | None = None,
    limits: Limits = Limits(),
) -> LoadedModel:
    """Same as ``load_model`` for a model already in memory (it must not use external data)."""
    if any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise UsageError("an in-memory model with external data cannot be cleaned; pass its path")
    proto_copy = onnx.ModelProto()
    proto_copy.CopyFrom(proto)
    with _loader_errors("the model"):
        model = describe_model(proto_copy, input_shape, output_name, limits)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    return LoadedModel(path=None, sha256=digest, **model)


def _read_bytes(path: Path, limits: Limits) -> bytes:
    with open_regular(path, "an .onnx file") as handle:  # a FIFO or device is refused, never read
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise UnreadableModelError(f"{path}: file is empty, not an ONNX model")
        if size > limits.max_file_bytes:
            raise UnsupportedModelError(
                f"{path}: file is {size} bytes, above the --max-file-bytes limit of {limits.max_file_bytes}"
            )
        try:
            return handle.read(size)  # no more than the size checked, even if the file grows
        except OSError as error:
            raise UsageError(f"{path}: cannot read: {error.strerror}") from error


def _parse(data: bytes, path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as error:
        raise UnreadableModelError(f"{path}: not an ONNX model (protobuf parse failed)") from error
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise UnreadableModelError(f"{path}: not an ONNX model (no graph or IR version)")
    return proto


def _inline_external_data(proto: onnx.ModelProto, base_dir: Path, limits: Limits) -> None:
    """Load external tensors, refusing any location that leaves the model's folder.

    The bytes to be read are totalled before reading any: a few tensors each pointing at the
    whole of one large file would otherwise multiply it in memory.
    """
    base = base_dir.resolve()
    total = 0
    for tensor in external_data_helper._get_all_tensors(proto):  # noqa: SLF001 - onnx's own walker
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            with warnings.catch_warnings():  # unknown keys are ignored; a warning would be a 2nd stderr line
                warnings.simplefilter("ignore")
                info = external_data_helper.ExternalDataInfo(tensor)
        except (ValueError, TypeError) as error:  # offset or length that is not an integer
            raise UnreadableModelError(f"tensor '{tensor.name}': malformed external data entry: {error}") from error
        try:
            target = _external_target(tensor.name, info.location, base)
            total += _external_length(tensor.name, info, target)
        except (OSError, ValueError, TypeError, RuntimeError) as error:  # NUL or bad UTF-8, too long, a loop
            raise UnreadableModelError(
                f"tensor '{tensor.name}': unusable external data location {info.location[:80]!r}: {error}"
            ) from error
        if total > limits.max_file_bytes:
            raise UnsupportedModelError(
                f"external data adds up to more than the --max-file-bytes limit of {limits.max_file_bytes} bytes"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            external_data_helper.load_external_data_for_model(proto, str(base))
    except onnx.checker.ValidationError as error:  # onnx's own path checks (hard links, escapes)
        raise UnsupportedModelError(f"onnx refuses the external data: {one_line(error, 'invalid location')}") from error
    except (OSError, ValueError) as error:
        raise UnreadableModelError(f"cannot read external data: {error}") from error


def _external_target(name: str, location: str, base: Path) -> Path:
    """The file ``location`` names, refused unless it is a regular file inside ``base``."""
    if not location:
        raise UnreadableModelError(f"tensor '{name}': external data has no location")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise UnsupportedModelError(f"tensor '{name}': external data location '{location}' is absolute; refused")
    target = (base / location).resolve()  # follows symlinks: a link out of the folder is caught below
    if base != target and base not in target.parents:
        raise UnsupportedModelError(
            f"tensor '{name}': external data location '{location}' leaves the model folder; refused"
        )
    if not target.is_file():  # missing, a folder, or a FIFO that would block the read forever
        raise UnreadableModelError(f"tensor '{name}': external data file '{location}' is missing or not a regular file")
    links = target.stat().st_nlink
    if links > 1:  # another name of the same bytes may live anywhere on the file system
        raise UnsupportedModelError(
            f"tensor '{name}': external data file '{location}' has {links} hard links; refused, since a hard "
            "link can make a file from outside the model folder look local"
        )
    return target


def _external_length(name: str, info: external_data_helper.ExternalDataInfo, target: Path) -> int:
    """How many bytes loading this tensor reads (onnx reads to the end when no length is given)."""
    offset = info.offset or 0
    size = target.stat().st_size
    if offset < 0 or (info.length is not None and info.length < 0) or offset > size:
        raise UnreadableModelError(f"tensor '{name}': external data offset {offset} / length {info.length} is invalid")
    available = size - offset
    return min(info.length, available) if info.length else available


def describe_model(
    proto: onnx.ModelProto,
    input_shape: tuple[int, ...] | None,
    output_name: str | None,
    limits: Limits,
) -> dict:
    """Check the model and find its image input and logits output."""
    graph = proto.graph
    if len(graph.node) == 0:
        raise UnreadableModelError("the graph has no nodes")
    if len(graph.node) > limits.max_nodes:
        raise UnsupportedModelError(
            f"the graph has {len(graph.node)} nodes, above the --max-nodes limit of {limits.max_nodes}"
        )
    _check_names(graph)
    _check_domains(proto)
    _check_size(proto)
    sizes = _tensor_sizes(_check_structure(proto).graph)  # the inferred copy is dropped at once
    _check_constants(proto)
    input_name, shape = _find_image_input(graph, input_shape, limits)
    out_name, out_index = _find_output(graph, output_name)
    _check_tensor_sizes(sizes, limits)  # after the input's own cap, before anything runs the graph
    _check_output_depends_on_input(graph, input_name, out_name)
    columns = _check_runs(proto, input_name, shape, out_name)
    working, batch = batch_plan(proto, input_name, shape, out_name)
    single = single_score_kind(graph, out_name) if columns == 1 else None
    if single is not None:
        working = two_class_graph(working if working is not None else proto, out_name, single)
    return {
        "working_proto": working,
        "batch": batch,
        "single_score": single,
        "proto": proto,
        "input_name": input_name,
        "input_shape": shape,
        "output_name": out_name,
        "output_index": out_index,
        "output_is_probability": _ends_in_softmax(graph, out_name) or single == "probability",
        "opset": default_opset(proto),
    }


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


def _check_names(graph: onnx.GraphProto) -> None:
    for what, name in _graph_names(graph):
        if not isinstance(name, str):  # protobuf hands back bytes for a string that is not UTF-8
            raise UnreadableModelError(f"{what} name {bytes(name)[:60]!r} is not valid UTF-8")
        if _unsafe_name(name):
            raise UnsupportedModelError(
                f"{what} name {name[:60]!r} contains a quote, backslash or control character; refused, "
                "since names reach generated PyTorch code"
            )


def _check_size(proto: onnx.ModelProto) -> None:
    size = proto.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise UnsupportedModelError(
            f"the model with its external data is {size} bytes; models of 2 GiB or more cannot be cleaned"
        )


def _check_structure(proto: onnx.ModelProto) -> onnx.ModelProto:
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


def _tensor_sizes(graph: onnx.GraphProto) -> list[tuple[str, int]]:
    """(name, elements) of every tensor whose shape inference sized, If / Loop bodies included.

    Symbolic dims (the batch) count as 1. Sizes only known when the graph runs (a shape read
    from the data) are not bounded by this.
    """
    found = [(v.name, n) for v in (*graph.value_info, *graph.output) if (n := _declared_elements(v.type)) is not None]
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                found += _tensor_sizes(sub)
    return found


def _check_tensor_sizes(sizes: list[tuple[str, int]], limits: Limits) -> None:
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


def _check_constants(proto: onnx.ModelProto) -> None:
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


def _check_domains(proto: onnx.ModelProto) -> None:
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


def _find_image_input(
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


def _find_output(graph: onnx.GraphProto, wanted: str | None) -> tuple[str, int]:
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


def _check_output_depends_on_input(graph: onnx.GraphProto, input_name: str, output_name: str) -> None:
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


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (they derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (RuntimeError, ValueError, TypeError, *found)


def _check_runs(proto: onnx.ModelProto, input_name: str, shape: tuple[int, ...], output_name: str) -> int:
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


def _ends_in_softmax(graph: onnx.GraphProto, output_name: str) -> bool:
    """True when the output is a probability vector, so unlearning must work on its log."""
    for node in graph.node:
        if output_name in node.output:
            return node.op_type == "Softmax"
    return False
