"""Where a layer's weights are stored, and the float32 working copy every later stage reads.

Exporters keep a weight in more places than a plain float32 initializer:

- ``initializer``: the plain case;
- ``constant``: the ``value`` tensor of a ``Constant`` node (Paddle, some TF converters);
- through ``Identity`` nodes: torch's legacy exporter deduplicates equal tensors (zero biases)
  and feeds the copies through ``Identity``;
- through ``Cast`` to float: float16 / bfloat16 / float64 storage;
- through ``DequantizeLinear``: an int8 / uint8 / int32 tensor with a scale and zero point (QDQ).

``resolve`` walks each weight slot (the value a Conv / ConvTranspose / Gemm / MatMul reads) back
to its storage once; ``working_model`` builds a float32 copy in which every such slot is a plain
float32 initializer named after the slot (what onnx2torch and the method stages understand), and
``write_back`` puts new slot values into the storage they came from in a copy of the ORIGINAL
graph, in the storage's own dtype. The original graph is never edited.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.errors import ConversionError

INITIALIZER = "initializer"
CONSTANT = "constant"

FLOAT_STORAGE = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
REDUCED_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
QUANTIZED = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QOPERATOR_OPS = ("ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear")  # besides every QLinear* op
_VALUE_FIELDS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data")
# A requantized weight keeps its scale unless an element would be clipped by more than this many
# quantization steps: a step or less is the rounding the model already lives with.
CLIP_STEPS = 1.0


@dataclass(frozen=True)
class Stored:
    """One constant tensor of the original graph: an initializer or a Constant node's value."""

    where: str  # INITIALIZER or CONSTANT
    name: str  # the initializer's name, or the Constant node's output name
    node: str | None = None  # the Constant node's name
    dtype: int = TensorProto.FLOAT


@dataclass(frozen=True)
class WeightSource:
    """How the value a node reads (``slot``) is computed from stored constants."""

    slot: str
    stored: Stored
    through: tuple[str, ...] = ()  # op types between the storage and the slot, storage side first
    scale: Stored | None = None  # DequantizeLinear scale and zero point
    zero_point: Stored | None = None
    axis: int = 1
    weight_slot: str | None = None  # for a bias slot: its node's weight slot (int32 bias scales follow it)

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def kind(self) -> str:
        """How the report names the storage, e.g. ``initializer``, ``constant``,
        ``initializer>Identity``, ``initializer(INT8)>DequantizeLinear``."""
        dtype = "" if self.stored.dtype == TensorProto.FLOAT else f"({TensorProto.DataType.Name(self.stored.dtype)})"
        return ">".join([self.stored.where + dtype, *self.through])

    def as_dict(self) -> dict:
        return {"slot": self.slot, "storage": self.stored.where, "tensor": self.stored.name,
                "constant_node": self.stored.node, "dtype": TensorProto.DataType.Name(self.stored.dtype),
                "through": list(self.through), "quantized": self.quantized}


@dataclass
class WriteNotes:
    """What ``write_back`` had to do beyond copying values (the report shows it)."""

    clipped: dict[str, int] = field(default_factory=dict)  # storage -> elements clipped to the int range
    new_scales: list[str] = field(default_factory=list)  # weight scale tensors re-derived (and bias scales that follow)

    def as_dict(self) -> dict:
        return {"clipped": dict(self.clipped), "new_scales": list(self.new_scales)}


# --- resolving ----------------------------------------------------------------------------------

class _Graph:
    """Look-ups over one graph: initializers, Constant values, producers and readers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {name: node for node in graph.node for name in node.output if name}
        self.readers = Counter(name for node in graph.node for name in node.input if name)
        self.outputs = {v.name for v in graph.output}

    def stored(self, name: str) -> Stored | None:
        if name in self.inits:
            return Stored(INITIALIZER, name, None, self.inits[name].data_type)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            tensor = constant_tensor(node)
            if tensor is not None:
                return Stored(CONSTANT, name, node.name, tensor.data_type)
        return None


def constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The ``value`` tensor of a Constant node (other value_* forms are not weights)."""
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.HasField("t"):
            return attribute.t
    return None


def _trace(graph: _Graph, name: str, depth: int = 0) -> WeightSource | None:
    """The storage ``name`` is computed from through Identity / Cast / DequantizeLinear, if any."""
    stored = graph.stored(name)
    if stored is not None:
        return WeightSource(name, stored)
    node = graph.producer.get(name)
    if node is None or depth > 16:
        return None
    if node.op_type == "Identity":
        inner = _trace(graph, node.input[0], depth + 1)
        return None if inner is None else _extend(inner, name, "Identity")
    if node.op_type == "Cast" and _cast_to(node) in FLOAT_STORAGE:
        inner = _trace(graph, node.input[0], depth + 1)
        if inner is None or inner.quantized or inner.stored.dtype not in FLOAT_STORAGE:
            return None
        return _extend(inner, name, "Cast")
    if node.op_type == "DequantizeLinear":
        return _trace_dequantize(graph, node, name, depth)
    return None


def _extend(inner: WeightSource, slot: str, op_type: str) -> WeightSource:
    return WeightSource(slot, inner.stored, (*inner.through, op_type), inner.scale, inner.zero_point, inner.axis)


def _trace_dequantize(graph: _Graph, node: onnx.NodeProto, name: str, depth: int) -> WeightSource | None:
    quantize = graph.producer.get(node.input[0])
    if quantize is not None and quantize.op_type == "QuantizeLinear":
        # a float weight quantized when the graph runs (fake quantization): the float tensor is
        # the storage, and the graph keeps quantizing whatever is written there
        inner = _trace(graph, quantize.input[0], depth + 1)
        if inner is None or inner.quantized or inner.stored.dtype not in FLOAT_STORAGE:
            return None
        return WeightSource(name, inner.stored, (*inner.through, "QuantizeLinear", "DequantizeLinear"))
    inner = _trace(graph, node.input[0], depth + 1)
    if inner is None or inner.quantized or inner.stored.dtype not in QUANTIZED:
        return None
    scale = graph.stored(node.input[1]) if len(node.input) > 1 else None
    zero = graph.stored(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zero is None):
        return None
    axis = 1
    for attribute in node.attribute:
        if attribute.name == "axis":
            axis = attribute.i
        if attribute.name == "block_size" and attribute.i:
            return None  # blocked quantization: not supported
    return WeightSource(name, inner.stored, (*inner.through, "DequantizeLinear"), scale, zero, axis)


def _cast_to(node: onnx.NodeProto) -> int | None:
    for attribute in node.attribute:
        if attribute.name == "to":
            return attribute.i
    return None


def weight_slots(node: onnx.NodeProto) -> list[tuple[str, str | None]]:
    """(slot, weight slot of the same node) for the constant-operand inputs of a weight op."""
    if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
        return []
    if node.op_type == "MatMul":
        return [(node.input[0], None), (node.input[1], None)]
    slots = [(node.input[1], None)]
    if len(node.input) > 2 and node.input[2]:
        slots.append((node.input[2], node.input[1]))
    return slots


def resolve(model: onnx.ModelProto) -> dict[str, WeightSource]:
    """Slot name -> its storage, for every weight-op operand and every DequantizeLinear output
    computed from constants (each becomes a float32 initializer of the working copy)."""
    graph = _Graph(model.graph)
    sources: dict[str, WeightSource] = {}
    for node in model.graph.node:
        for slot, weight_slot in weight_slots(node):
            found = _trace(graph, slot)
            if found is not None and (found.stored.dtype in FLOAT_STORAGE or found.quantized):
                sources[slot] = WeightSource(found.slot, found.stored, found.through, found.scale,
                                             found.zero_point, found.axis, weight_slot)
        if node.op_type == "DequantizeLinear" and node.output[0] not in sources:
            found = _trace(graph, node.output[0])
            if found is not None:
                sources[node.output[0]] = found
    return sources


def resolve_statistics(model: onnx.ModelProto) -> dict[str, WeightSource]:
    """Slot name -> its storage, for the four constant inputs (scale, bias, mean, variance) of every
    BatchNormalization node whose four are float32 initializers that this node alone reads.

    A remover that trains in BatchNorm's train mode re-estimates the running statistics, and the
    model handed back must carry them (a user's later recalibration would otherwise meet weights
    fitted to other statistics). Anything else (float16 or quantized statistics, a tensor another
    node reads too) is left out: that node's statistics then stay as they are."""
    graph = _Graph(model.graph)
    sources: dict[str, WeightSource] = {}
    for node in model.graph.node:
        slots = statistics_slots(node)
        found = [graph.stored(slot) for slot in slots]
        if slots and all(s is not None and s.where == INITIALIZER and s.dtype == TensorProto.FLOAT
                         and graph.readers[s.name] == 1 and s.name not in graph.outputs for s in found):
            sources.update({slot: WeightSource(slot, stored) for slot, stored in zip(slots, found)})
    return sources


def statistics_slots(node: onnx.NodeProto) -> list[str]:
    """A BatchNormalization's scale, bias, running mean and running variance inputs."""
    if node.op_type != "BatchNormalization" or len(node.input) < 5 or not all(node.input[1:5]):
        return []
    return list(node.input[1:5])


def shared_storages(sources: dict[str, WeightSource], model: onnx.ModelProto) -> dict[str, int]:
    """Slot -> how many readers its storage has, for the slots whose storage has more than one.

    A reader is any node other than a link of a constant chain (Identity, Cast, DequantizeLinear)
    that reads a value computed from the stored tensor, or a graph output: a BatchNormalization
    reading ``bn.bias`` and two Conv reading it through Identity are three readers.
    """
    graph = _Graph(model.graph)
    chain_ops = {"Identity", "Cast", "QuantizeLinear", "DequantizeLinear"}
    readers: Counter[str] = Counter()
    names = [name for node in model.graph.node if node.op_type not in chain_ops for name in node.input if name]
    for name in [*names, *graph.outputs]:
        found = sources.get(name) or _trace(graph, name)
        if found is not None:
            readers[found.stored.name] += 1
    return {slot: readers[s.stored.name] for slot, s in sources.items() if readers[s.stored.name] > 1}


# --- values -------------------------------------------------------------------------------------

def _array(model_index: _Graph, stored: Stored) -> np.ndarray:
    if stored.where == INITIALIZER:
        return numpy_helper.to_array(model_index.inits[stored.name])
    return numpy_helper.to_array(constant_tensor(model_index.producer[stored.name]))


def _broadcast(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-tensor or per-axis quantization parameter shaped to broadcast against the tensor."""
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * rank
    shape[axis % rank] = param.size
    return param.reshape(shape)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    s = _broadcast(scale.astype(np.float32), q.ndim, axis)
    z = 0 if zero is None else _broadcast(zero.astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def effective(model: onnx.ModelProto, sources: dict[str, WeightSource]) -> dict[str, np.ndarray]:
    """Slot -> the float32 value the node reads (dequantized, cast), for every source."""
    index = _Graph(model.graph)
    values = {}
    for slot, source in sources.items():
        raw = _array(index, source.stored)
        if source.quantized:
            scale = _array(index, source.scale)
            zero = _array(index, source.zero_point) if source.zero_point else None
            values[slot] = dequantize(raw, scale, zero, source.axis)
        else:
            values[slot] = raw.astype(np.float32)
    return values


# --- the float32 working copy -------------------------------------------------------------------

def working_model(model: onnx.ModelProto, sources: dict[str, WeightSource] | None = None) -> onnx.ModelProto:
    """A float32 copy of ``model`` that onnx2torch converts and the method stages read (``model``
    itself where every weight already is a float32 initializer: no stage edits it).

    Every resolved slot that is not already a plain float32 initializer becomes one (named after
    the slot, its producer node dropped); float16 / bfloat16 tensors and casts become float32;
    activation QuantizeLinear -> DequantizeLinear pairs become an Identity (the float model the
    quantized one approximates). Node names and the slots' names are kept, so a weight slot
    names the same tensor in both graphs. QOperator models (QLinearConv ...) are refused.
    """
    _refuse_qoperator(model)
    sources = resolve(model) if sources is None else sources
    folded = {slot for slot, s in sources.items()
              if not (s.stored.where == INITIALIZER and s.stored.name == slot and s.stored.dtype == TensorProto.FLOAT)}
    if not folded and _precision(model) == "float32":
        return model  # already what the stages need: no copy of a large model's weights (never edited)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    index = _Graph(work.graph)
    values = effective(model, {slot: sources[slot] for slot in folded})  # plain float32 weights are not copied
    kept = [node for node in work.graph.node if not set(node.output) & folded]  # Identity, Cast, DQ, Constant
    for slot in sorted(folded):
        if slot in index.inits:
            work.graph.initializer.remove(index.inits[slot])
        work.graph.initializer.append(numpy_helper.from_array(values[slot], slot))
    del work.graph.node[:]
    work.graph.node.extend(kept)
    _unpair_activation_qdq(work)
    _to_float32(work)
    _drop_dead(work)
    _drop_value_info(work)
    return work


def qoperator_refusal(model: onnx.ModelProto) -> str | None:
    """Why a QOperator-format model (QLinearConv, ConvInteger ... in any domain) cannot be
    cleaned, or None: its weights live inside integer kernels, not in float ops the working copy
    can dequantize."""
    for node in model.graph.node:
        if node.op_type.startswith("QLinear") or node.op_type in QOPERATOR_OPS:
            return (f"node '{node.name}' is a QOperator-format quantized op ({node.op_type}); only QDQ-format "
                    "quantized models (QuantizeLinear/DequantizeLinear around float ops) can be cleaned")
    return None


def _refuse_qoperator(model: onnx.ModelProto) -> None:
    message = qoperator_refusal(model)
    if message:
        raise ConversionError(message)


def _unpair_activation_qdq(work: onnx.ModelProto) -> None:
    """DequantizeLinear(QuantizeLinear(x)) on activations -> Identity(x), keeping the DQ's name."""
    producer = {name: node for node in work.graph.node for name in node.output if name}
    for node in work.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type != "QuantizeLinear":
            raise ConversionError(
                f"DequantizeLinear '{node.name}' reads '{node.input[0]}', neither a quantized constant nor a "
                "QuantizeLinear output; this quantization pattern is not supported"
            )
        output, name = node.output[0], node.name
        node.CopyFrom(helper.make_node("Identity", [source.input[0]], [output], name=name))
    readers = {name for node in work.graph.node for name in node.input}
    for node in work.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in readers:
            raise ConversionError(
                f"QuantizeLinear '{node.name}' feeds something other than a DequantizeLinear; "
                "this quantization pattern is not supported"
            )


def _to_float32(work: onnx.ModelProto) -> None:
    """Every float16 / bfloat16 tensor, cast and declared type of the copy becomes float32."""
    for position, tensor in enumerate(work.graph.initializer):
        if tensor.data_type in REDUCED_FLOATS:
            work.graph.initializer[position].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for node in work.graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i in REDUCED_FLOATS:
                attribute.i = TensorProto.FLOAT
            if attribute.HasField("t") and attribute.t.data_type in REDUCED_FLOATS:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name))
    for value in (*work.graph.input, *work.graph.output):
        if value.type.tensor_type.elem_type in REDUCED_FLOATS:
            value.type.tensor_type.elem_type = TensorProto.FLOAT


def _drop_dead(work: onnx.ModelProto) -> None:
    """Drop nodes of the constant chains no one reads any more (Identity, Cast, Q/DQ, Constant)."""
    removable = {"Identity", "Cast", "QuantizeLinear", "DequantizeLinear", "Constant"}
    outputs = {v.name for v in work.graph.output}
    while True:
        readers = {name for node in work.graph.node for name in node.input} | outputs
        dead = [node for node in work.graph.node
                if node.op_type in removable and not any(name in readers for name in node.output)]
        if not dead:
            break
        for node in dead:
            work.graph.node.remove(node)
    readers = {name for node in work.graph.node for name in node.input}
    unused = [t for t in work.graph.initializer if t.name not in readers and t.name not in outputs]
    for tensor in unused:
        work.graph.initializer.remove(tensor)


def _drop_value_info(work: onnx.ModelProto) -> None:
    """Shape annotations may name dropped values or old dtypes; inference re-derives them."""
    del work.graph.value_info[:]


# --- writing back -------------------------------------------------------------------------------

def _tensor_of(model: onnx.ModelProto, index: _Graph, stored: Stored) -> TensorProto:
    if stored.where == INITIALIZER:
        return index.inits[stored.name]
    return constant_tensor(index.producer[stored.name])


def _store(tensor: TensorProto, value: np.ndarray) -> None:
    """Replace the values of ``tensor`` in its own dtype; name, dims, dtype and doc are kept."""
    shape = tuple(tensor.dims)
    if tuple(value.shape) != shape:
        raise ValueError(f"tensor {tensor.name!r}: new shape {value.shape} != {shape}")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    raw = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype, copy=False)), tensor.name).raw_data
    for name in _VALUE_FIELDS:
        tensor.ClearField(name)
    tensor.raw_data = raw


def write_back(original: onnx.ModelProto, weights: dict[str, np.ndarray],
               sources: dict[str, WeightSource]) -> tuple[onnx.ModelProto, WriteNotes]:
    """A copy of ``original`` whose weight storages hold ``weights`` (slot -> float32 value).

    Float storages take the value in their own dtype (float16, bfloat16 ...). Quantized ones are
    requantized with their own scale and zero point; an element clipped by more than
    ``CLIP_STEPS`` steps re-derives that weight's scale (larger, zero point kept) when the scale
    tensor is its own, and an int32 bias quantized against it follows, so bias scale = input
    scale x weight scale still holds. Activation quantization parameters never change.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    index = _Graph(model.graph)
    notes = WriteNotes()
    missing = sorted(set(weights) - set(sources))
    if missing:
        raise KeyError(f"no weight storage for {missing[0]!r}")
    _check_consistent(weights, sources)
    rescaled: dict[str, np.ndarray] = {}  # weight slot -> new scale / old scale
    free = _rescalable(original, index, sources)
    for slot in sorted(weights, key=lambda s: sources[s].weight_slot is not None):  # weights before biases
        source = sources[slot]
        value = np.asarray(weights[slot], dtype=np.float32)
        if not source.quantized:
            _store(_tensor_of(model, index, source.stored), value)
            continue
        ratio = rescaled.get(source.weight_slot) if source.weight_slot else None
        rescaled[slot] = _requantize(model, index, source, value, ratio, notes, slot in free)
    current = effective(original, sources)
    for slot, source in sources.items():  # int32 biases of rescaled weights that were not rewritten
        if slot not in weights and source.quantized and source.weight_slot in rescaled \
                and np.any(rescaled[source.weight_slot] != 1):
            _requantize(model, index, source, current[slot], rescaled[source.weight_slot], notes)
    return model, notes


def _rescalable(original: onnx.ModelProto, index: _Graph, sources: dict[str, WeightSource]) -> set[str]:
    """Quantized weight slots whose scale may be re-derived: the scale tensor is read by their
    DequantizeLinear alone, and an int32 bias quantized against it can follow (its own scale
    tensor, its values read by no other node). Otherwise other readers would see new values."""
    shared = shared_storages(sources, original)
    bias_of = {source.weight_slot: slot for slot, source in sources.items() if source.weight_slot}
    free = set()
    for slot, source in sources.items():
        if not source.quantized or source.weight_slot is not None or index.readers[source.scale.name] != 1:
            continue
        bias = sources.get(bias_of.get(slot, ""))
        if bias is not None and bias.quantized and (bias.slot in shared or index.readers[bias.scale.name] != 1):
            continue
        free.add(slot)
    return free


def _check_consistent(weights: dict[str, np.ndarray], sources: dict[str, WeightSource]) -> None:
    """Two slots of one storage (a weight shared through Identity) must get the same value."""
    first: dict[str, str] = {}
    for slot in weights:
        key = sources[slot].stored.name
        if key in first and not np.array_equal(weights[first[key]], weights[slot]):
            raise ValueError(f"slots {first[key]!r} and {slot!r} share tensor {key!r} but got different values")
        first.setdefault(key, slot)


def _requantize(model: onnx.ModelProto, index: _Graph, source: WeightSource, value: np.ndarray,
                ratio: np.ndarray | None, notes: WriteNotes, may_rescale: bool = False) -> np.ndarray:
    """Store ``value`` quantized; returns new scale / old scale (ones when the scale was kept).

    ``ratio`` (an int32 bias following its weight) scales the scale as given; otherwise the scale
    is re-derived where ``may_rescale`` and an element would be clipped by over ``CLIP_STEPS``."""
    tensor = _tensor_of(model, index, source.stored)
    scale_tensor = _tensor_of(model, index, source.scale)
    scale = numpy_helper.to_array(scale_tensor).astype(np.float32)
    zero = (numpy_helper.to_array(_tensor_of(model, index, source.zero_point)).astype(np.int64)
            if source.zero_point else np.zeros((), np.int64))
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    new_scale = scale * ratio.reshape(scale.shape) if ratio is not None else scale
    if ratio is None and may_rescale and _clip_steps(value, scale, zero, source.axis, info) > CLIP_STEPS:
        new_scale = _derived_scale(value, scale, zero, source.axis, info)
    s = _broadcast(new_scale, value.ndim, source.axis)
    z = _broadcast(zero, value.ndim, source.axis)
    q = np.rint(value / s) + z
    clipped = int(np.count_nonzero((q < info.min) | (q > info.max)))
    if clipped:
        notes.clipped[source.stored.name] = clipped
    _store(tensor, np.clip(q, info.min, info.max).astype(np.int64))
    if not np.array_equal(new_scale, scale):
        _store(scale_tensor, new_scale.astype(np.float32))
        notes.new_scales.append(source.scale.name)
    return (new_scale / scale).astype(np.float32)


def _clip_steps(value, scale, zero, axis, info) -> float:
    """How many quantization steps beyond the integer range the worst element lands."""
    s = _broadcast(scale, value.ndim, axis)
    q = value / s + _broadcast(zero, value.ndim, axis)
    over = np.maximum(q - info.max, info.min - q)
    return float(np.max(over, initial=0.0))


def _derived_scale(value, scale, zero, axis, info) -> np.ndarray:
    """The smallest scale >= the old one (per channel where the old one is) that fits ``value``
    with the zero point kept."""
    moved = np.moveaxis(value, axis % value.ndim, 0).reshape(value.shape[axis % value.ndim], -1) \
        if scale.size > 1 else value.reshape(1, -1)
    z = zero.reshape(-1, 1).astype(np.float64) if zero.size > 1 else np.float64(zero.reshape(()))
    high = np.max(moved, axis=1, keepdims=True) / np.maximum(info.max - z, 1)
    low = np.min(moved, axis=1, keepdims=True) / np.minimum(info.min - z, -1)
    needed = np.maximum(high, low).reshape(-1)
    return np.maximum(scale.reshape(-1), needed).astype(np.float32).reshape(scale.shape)


# --- the whole picture, once per model ----------------------------------------------------------

@dataclass(frozen=True)
class WeightStorage:
    """Every slot's storage, the float32 working copy, and which storages several nodes read."""

    sources: dict[str, WeightSource]
    working: onnx.ModelProto
    shared: dict[str, int]  # slot -> readers of its storage, where more than one
    precision: str  # the narrowest number format of the model: "int8", "bfloat16", "float16" or "float32"
    # BatchNormalization inputs that may be written back (``resolve_statistics``); not weight slots
    statistics: dict[str, WeightSource] = field(default_factory=dict)

    @property
    def writable(self) -> dict[str, WeightSource]:
        """Every slot ``write_back`` may write: the weight slots and the BatchNorm statistics."""
        return {**self.sources, **self.statistics}

    @property
    def lossy(self) -> bool:
        """The model computes in less precision than its float32 working copy."""
        return self.precision != "float32"

    def counts(self) -> dict[str, int]:
        """How many weight slots live in each kind of storage."""
        return dict(Counter(source.kind for source in self.sources.values()))


def analyse(model: onnx.ModelProto) -> WeightStorage:
    """Resolve the storages of ``model`` and build its working copy (``model`` is not changed)."""
    sources = resolve(model)
    return WeightStorage(sources, working_model(model, sources), shared_storages(sources, model), _precision(model),
                         resolve_statistics(model))


def _precision(model: onnx.ModelProto) -> str:
    graph = model.graph
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node):
        return "int8"
    types = {t.data_type for t in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute:
            types |= {attribute.i} if attribute.name == "to" else set()
            types |= {attribute.t.data_type} if attribute.HasField("t") else set()
    for dtype, name in ((TensorProto.BFLOAT16, "bfloat16"), (TensorProto.FLOAT16, "float16")):
        if dtype in types:
            return name
    return "float32"
