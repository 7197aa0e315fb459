"""Channel-tie analysis: which weight layers' neurons must move together during OT fusion.

OT fusion transports the neurons (output channels) of each weight layer with a plan ``T``. The
fused model keeps the backdoored model's channel order, so the plan only matters where a
later layer reads those channels: its *pruned* weights must be re-expressed in the new order
(``Wp' = Wp . A`` on the input axis, ``A = T diag(1/q)``). That is only sound when every value on
that input axis came through ops that keep channel ``c`` at position ``c``.

The analysis walks the graph in topological order and labels every tensor's channel axis:

* ``Channels``: the axis is a concatenation of *segments*, each the output channels of one
  source layer (or a fixed, untransported block), possibly each repeated ``repeat`` times (a
  ``Flatten`` of ``[N, C, H, W]`` repeats every channel ``H*W`` times).
* ``FIXED``: an activation whose channel order is never changed (the graph input, or a tensor
  whose channels were reduced away).
* ``CONST``: a value that does not depend on the input (weights, shapes); it stays in the
  backdoored model's order, which the fused model keeps.

A three-layer example. ``a = Conv1(x)``, ``b = Conv2(relu(a))``, ``y = Conv3(a + b)``::

    x -> Conv1 -> a --------------+
                  |                Add -> Conv3 -> y
                  +-> Relu -> Conv2 -> b

``Add`` ties Conv1 and Conv2: channel ``c`` of ``a + b`` is the sum of channel ``c`` of both, so
both must receive the SAME plan or Conv3 would read misaligned sums. They form one *group*
and share one plan. Conv2 reads Conv1's channels (through ``Relu``, which keeps channels in
place), so Conv2's input axis is aligned with the group's plan; Conv3's input is aligned
with it too.

Where a tie cannot be honoured (channels flow into an op whose channel mapping is unknown,
such as attention reshapes, a ``Slice`` across a segment, a graph output, a grouped conv) the
sources involved are *pinned*: their group takes the identity plan, so the fused layer is
``lambda * Wp' + (1 - lambda) * Wb`` with no transport. A depthwise conv is a *follower*: it has
no plan of its own and carries its input's plan, since channel ``c`` out depends only on
channel ``c`` in. Pinning can only make the fused model closer to the backdoored one; it never
misaligns it.

A ``MatMul`` whose constant weight contracts an axis other than the tracked channels (an
MLP-Mixer's token mixing, ``W @ X`` over tokens) keeps channel ``c`` at ``c``: the channels flow
through it, and the layer itself is pinned, since its own neurons lie on an untracked axis.
ConvTranspose layers are sources like convs (their neurons are axis 1 of the weight). Shapes
come from ONNX shape inference, and from one onnxruntime run where inference gives up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from otbr_onnx.layers import IN_OUT, WeightLayer

SOURCE, FOLLOWER, PINNED = "source", "follower", "pinned"

# Ops that act on each channel independently: channel c out depends only on channel c in.
CHANNELWISE = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Clip",
    "Dropout", "Identity", "Cast", "CastLike", "BatchNormalization", "InstanceNormalization",
    "Floor", "Ceil", "Round", "Mish", "Sign", "ThresholdedRelu", "Shrink", "Swish",
    # normalisations over the channel axis are permutation-equivariant, their parameters stay
    # in the backdoored order, which the fused model keeps
    "LayerNormalization", "Softmax", "LogSoftmax",
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}
SPATIAL_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"}
SHAPE_OPS = {"Shape", "Size"}


class _Const:
    def __repr__(self) -> str:
        return "CONST"


CONST = _Const()
FIXED = None


@dataclass(frozen=True)
class Channels:
    """The channel axis of a tensor, as segments of source-layer neurons."""

    axis: int  # negative index, counted from the last axis
    segments: tuple[tuple[int | None, int], ...]  # (weight-layer position or None = fixed, length)
    repeat: int = 1

    @property
    def width(self) -> int:
        return sum(length for _, length in self.segments)

    def sources(self) -> list[int]:
        return [src for src, _ in self.segments if src is not None]

    def moved(self, axis: int, repeat: int | None = None) -> "Channels":
        return Channels(axis, self.segments, self.repeat if repeat is None else repeat)


@dataclass
class ChannelTies:
    """The result: one role per weight layer, groups that share a plan, input channel maps."""

    layers: list[WeightLayer]
    roles: list[str]
    groups: list[int]  # group id per layer (= smallest member position); -1 for followers
    inputs: list[Channels | None]  # what each layer's input-channel axis carries (None: fixed)
    pin_reasons: dict[int, str] = field(default_factory=dict)
    heads: set[int] = field(default_factory=set)  # layers whose channels reach a graph output

    def members(self, group: int) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == group]

    def tied_groups(self) -> dict[int, list[int]]:
        """Groups of more than one layer: the channel ties the graph imposes."""
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.groups):
            if g >= 0:
                out.setdefault(g, []).append(i)
        return {g: m for g, m in out.items() if len(m) > 1}


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def static_shapes(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...]) -> dict[str, list[int]]:
    """Shapes of every value with the input fixed to ``input_shape`` and batch 2.

    Batch 2 rather than 1 keeps a reshape that merges the batch into another axis from
    looking like one that keeps it. ONNX shape inference comes first; where it leaves a node
    output unknown (the legacy exporter computes ``Reshape`` targets through
    ``Shape -> Gather -> Concat`` chains that data propagation does not always follow), the
    model is run once in onnxruntime and the real shapes fill the gaps. An unknown shape
    pins every layer whose channels pass through it, so each shape recovered here is a tie
    that can be honoured instead of pinned.
    """
    shapes = _inferred_shapes(model, input_name, input_shape)
    unknown = [name for node in model.graph.node for name in node.output
               if name and not _fully_known(shapes.get(name))]
    if unknown:
        shapes.update(_executed_shapes(model, input_name, input_shape, unknown))
    return shapes


def _fully_known(dims: list[int] | None) -> bool:
    return dims is not None and all(d > 0 for d in dims)


def _with_batch_two(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in (2,) + tuple(input_shape[1:]):
                dims.add().dim_value = int(size)
    return probe


def _inferred_shapes(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...]) -> dict[str, list[int]]:
    probe = _with_batch_two(model, input_name, input_shape)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort; unknown shapes pin
        inferred = probe
    shapes: dict[str, list[int]] = {}
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
                     names: list[str]) -> dict[str, list[int]]:
    """Shapes of ``names`` from one onnxruntime run on a batch of two constant images.

    A value onnxruntime cannot expose (a sequence, an optional) or a run that fails leaves the
    shape unknown: the walk then pins what flows through it, which is always safe.
    """
    import onnxruntime as ort

    probe = _with_batch_two(model, input_name, input_shape)
    declared = {v.name for v in probe.graph.output}
    wanted = [name for name in dict.fromkeys(names) if name not in declared]
    probe.graph.output.extend([onnx.ValueInfoProto(name=name) for name in wanted])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    batch = np.full((2,) + tuple(input_shape[1:]), 0.5, dtype=np.float32)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        values = session.run(outputs, {input_name: batch})
    except Exception:  # noqa: BLE001 - best effort, as for shape inference
        return {}
    wanted_set = set(names)
    return {name: list(np.shape(value)) for name, value in zip(outputs, values)
            if name in wanted_set and isinstance(value, np.ndarray)}


def analyse(
    model: onnx.ModelProto, layers: list[WeightLayer], input_name: str, input_shape: tuple[int, ...]
) -> ChannelTies:
    """Label every weight layer as source, follower or pinned and group the tied sources."""
    return _Walker(model, layers, input_name, input_shape).run()


class _Walker:
    def __init__(self, model: onnx.ModelProto, layers: list[WeightLayer], input_name: str,
                 input_shape: tuple[int, ...]) -> None:
        self.graph = model.graph
        self.layers = layers
        self.layer_at = {layer.node_index: i for i, layer in enumerate(layers)}
        self.shapes = static_shapes(model, input_name, input_shape)
        self.consts = {t.name: t for t in self.graph.initializer}
        self.state: dict[str, object] = {name: CONST for name in self.consts}
        self.state[input_name] = FIXED
        self.roles = [SOURCE] * len(layers)
        self.inputs: list[Channels | None] = [None] * len(layers)
        self.pins: dict[int, str] = {}
        self.ties = _UnionFind(len(layers))
        self.heads: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------
    def rank(self, name: str) -> int | None:
        dims = self.shapes.get(name)
        return None if dims is None else len(dims)

    def dims(self, name: str) -> list[int] | None:
        dims = self.shapes.get(name)
        return None if dims is None or any(d <= 0 for d in dims) else dims

    def pin(self, value: object, reason: str) -> None:
        if isinstance(value, Channels):
            for src in value.sources():
                self.pins.setdefault(src, reason)

    def const_array(self, name: str) -> np.ndarray | None:
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name])
        return self.const_values.get(name)

    # -- walk ------------------------------------------------------------------------------
    def run(self) -> ChannelTies:
        self.const_values: dict[str, np.ndarray] = {}
        for index, node in enumerate(self.graph.node):
            ins = [self.state.get(name, FIXED) if name else CONST for name in node.input]
            if index in self.layer_at:
                outs = [self.weight_layer(self.layer_at[index], node, ins)]
            elif all(v is CONST for v in ins) or node.op_type in SHAPE_OPS:
                self.record_constant(node)
                outs = [CONST] * len(node.output)
            else:
                outs = self.op(node, ins)
            for name, value in zip(node.output, outs):
                self.state[name] = self.checked(name, value, node)
        for output in self.graph.output:
            value = self.state.get(output.name)
            self.pin(value, f"reaches graph output '{output.name}'")
            if isinstance(value, Channels):
                self.heads.update(value.sources())
        return self.finish()

    def record_constant(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant" and node.attribute:
            try:
                self.const_values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            except Exception:  # noqa: BLE001 - non-tensor constants are irrelevant here
                pass

    def checked(self, name: str, value: object, node: onnx.NodeProto) -> object:
        """Drop a channel map whose width disagrees with the inferred shape (a safety net)."""
        if not isinstance(value, Channels):
            return value
        dims = self.shapes.get(name)
        if dims is None or -value.axis > len(dims):
            self.pin(value, f"shape of '{name}' unknown after {node.op_type} '{node.name}'")
            return FIXED
        size = dims[value.axis]
        if size > 0 and size != value.width * value.repeat:
            self.pin(value, f"channel count changes at {node.op_type} '{node.name}'")
            return FIXED
        return value

    def finish(self) -> ChannelTies:
        groups = [-1] * len(self.layers)
        for i, role in enumerate(self.roles):
            if role != FOLLOWER:
                groups[i] = self.ties.find(i)
        pinned_groups = {groups[i] for i in self.pins if groups[i] >= 0}
        for i, g in enumerate(groups):
            if g in pinned_groups:
                self.roles[i] = PINNED
                if i not in self.pins:
                    root_reason = next(self.pins[j] for j in self.pins if groups[j] == g)
                    self.pins[i] = f"tied to a pinned layer ({root_reason})"
        return ChannelTies(self.layers, self.roles, groups, self.inputs, self.pins, self.heads)

    # -- weight layers ---------------------------------------------------------------------
    def weight_layer(self, pos: int, node: onnx.NodeProto, ins: list) -> object:
        layer = self.layers[pos]
        value = ins[layer.data_input]
        in_axis = self.input_axis(layer, node)
        if isinstance(value, Channels) and value.axis != in_axis and self.passes_through(layer, node, value):
            # x @ W mixing tokens (MLP-Mixer) keeps channel c of x at c: the tracked channels
            # flow on, and the layer's own neurons lie on an axis no one tracks: pin it
            self.pins.setdefault(pos, f"{layer.op_type} mixes an axis other than the tracked channels")
            return value
        total_in = layer.in_channels * layer.groups
        if isinstance(value, Channels):
            if value.axis == in_axis and value.width * value.repeat == total_in:
                self.inputs[pos] = value
            else:
                self.pin(value, f"read by {layer.label} along another axis")
        out_axis = self.output_axis(layer, node, in_axis)
        if layer.is_depthwise:
            self.roles[pos] = FOLLOWER
            return self.inputs[pos].moved(out_axis) if self.inputs[pos] is not None else FIXED
        if layer.is_grouped:
            self.pin(self.inputs[pos], f"read by grouped conv {layer.label}")
            self.inputs[pos] = None
            self.pins.setdefault(pos, "grouped conv cannot transport its channels")
        return Channels(out_axis, ((pos, layer.out_channels),))

    def input_axis(self, layer: WeightLayer, node: onnx.NodeProto) -> int | None:
        """The (negative) axis of the data input that the weight contracts; None for a conv
        whose input rank is unknown (its channel axis, 1, cannot be counted from the end)."""
        if layer.is_conv_like:
            rank = self.rank(node.input[layer.data_input])
            return 1 - rank if rank is not None else None
        return -2 if (layer.op_type == "MatMul" and layer.layout != IN_OUT) else -1

    def output_axis(self, layer: WeightLayer, node: onnx.NodeProto, in_axis: int | None) -> int:
        """Where the layer's neurons lie in its output (a conv's channel axis is axis 1; with
        an unknown rank ``checked`` finds no shape to confirm it and pins the layer)."""
        if not layer.is_conv_like:
            return in_axis
        out_rank = self.rank(node.output[0])
        return 1 - out_rank if out_rank else -3

    def passes_through(self, layer: WeightLayer, node: onnx.NodeProto, value: Channels) -> bool:
        """A MatMul with a 2-D weight keeps every axis of its data input but the contracted
        one at the same position counted from the end (``X @ W``: all but the last; ``W @ X``:
        all but the second-to-last), as long as the input has at least two axes."""
        if layer.op_type != "MatMul":
            return False
        in_rank, out_rank = self.rank(node.input[layer.data_input]), self.rank(node.output[0])
        return in_rank is not None and in_rank == out_rank and in_rank >= 2 and -value.axis <= in_rank

    # -- other ops -------------------------------------------------------------------------
    def op(self, node: onnx.NodeProto, ins: list) -> list:
        kind = node.op_type
        live = [v for v in ins if v is not CONST]
        if kind in CHANNELWISE or kind in ("Pad", "Resize", "Upsample", "Expand"):
            return self.channelwise(node, ins)
        if kind in ELEMENTWISE:
            return [self.elementwise(node, ins)]
        if kind in SPATIAL_POOLS:
            return [self.pool(node, ins[0])]
        if kind == "Concat":
            return [self.concat(node, ins)]
        if kind in RESHAPES:
            return [self.reshape(node, ins[0])]
        if kind in REDUCES:
            return [self.reduce(node, ins[0])]
        if kind == "Transpose":
            return [self.transpose(node, ins[0])]
        if kind == "Gather":
            return [self.gather(node, ins[0])]
        for value in live:
            self.pin(value, f"flows into {kind} '{node.name}', whose channel mapping is not tracked")
        return [FIXED] * len(node.output)

    def channelwise(self, node: onnx.NodeProto, ins: list) -> list:
        value = ins[0]
        others = [v for v in ins[1:] if v is not CONST]
        if others:
            for v in [value] + others:
                self.pin(v, f"{node.op_type} '{node.name}' takes a non-constant parameter")
            return [FIXED] * len(node.output)
        if isinstance(value, Channels):
            in_dims, out_dims = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
            if in_dims is None or out_dims is None or len(in_dims) != len(out_dims) \
                    or in_dims[value.axis] != out_dims[value.axis]:
                self.pin(value, f"{node.op_type} '{node.name}' may change the channel axis")
                return [FIXED] * len(node.output)
        # extra outputs (BatchNorm training stats, Dropout mask) carry no channels we track
        return [value] + [FIXED] * (len(node.output) - 1)

    def elementwise(self, node: onnx.NodeProto, ins: list) -> object:
        tracked = [v for v in ins if isinstance(v, Channels)]
        fixed = [name for name, v in zip(node.input, ins) if v is FIXED]
        if not tracked:
            return FIXED
        first = tracked[0]
        for name in fixed:
            dims = self.shapes.get(name)
            # a fixed operand of size 1 on the channel axis (a spatial mask) touches no channel
            if dims is None or (-first.axis <= len(dims) and dims[first.axis] != 1):
                for v in tracked:
                    self.pin(v, f"added to an untracked tensor at {node.op_type} '{node.name}'")
                return FIXED
        for other in tracked[1:]:
            same_shape = (other.axis == first.axis and other.repeat == first.repeat
                          and [n for _, n in other.segments] == [n for _, n in first.segments])
            if not same_shape:
                for v in tracked:
                    self.pin(v, f"{node.op_type} '{node.name}' combines differently laid-out channels")
                return FIXED
            for (a, _), (b, _) in zip(first.segments, other.segments):
                if a is not None and b is not None:
                    self.ties.union(a, b)
                elif a is not None or b is not None:
                    self.pins.setdefault(a if a is not None else b,
                                         f"{node.op_type} '{node.name}' ties it to fixed channels")
        return first  # negative axes survive right-aligned broadcasting

    def pool(self, node: onnx.NodeProto, value: object) -> object:
        if not isinstance(value, Channels):
            return value
        rank = self.rank(node.input[0])
        if rank is None or rank + value.axis >= 2:  # pooling over the channel axis itself
            self.pin(value, f"{node.op_type} '{node.name}' pools over the channel axis")
            return FIXED
        return value

    def concat(self, node: onnx.NodeProto, ins: list) -> object:
        out_rank = self.rank(node.output[0])
        axis = _attr(node, "axis", 0)
        if out_rank is None:
            for v in ins:
                self.pin(v, f"Concat '{node.name}' has unknown rank")
            return FIXED
        axis = axis - out_rank if axis >= 0 else axis
        tracked = [v for v in ins if isinstance(v, Channels)]
        if not tracked:
            return FIXED
        if any(v.axis != axis for v in tracked):
            return self.elementwise(node, [v if v is not CONST else CONST for v in ins])
        repeat = tracked[0].repeat
        segments: list[tuple[int | None, int]] = []
        for name, v in zip(node.input, ins):
            if isinstance(v, Channels):
                if v.repeat != repeat:
                    for t in tracked:
                        self.pin(t, f"Concat '{node.name}' joins channels of different spatial size")
                    return FIXED
                segments.extend(v.segments)
            else:
                dims = self.shapes.get(name)
                if dims is None or dims[axis] <= 0 or dims[axis] % repeat:
                    for t in tracked:
                        self.pin(t, f"Concat '{node.name}' joins an operand of unknown size")
                    return FIXED
                segments.append((None, dims[axis] // repeat))
        return Channels(axis, tuple(segments), repeat)

    def reshape(self, node: onnx.NodeProto, value: object) -> object:
        if not isinstance(value, Channels):
            return value
        in_dims, out_dims = self.dims(node.input[0]), self.dims(node.output[0])
        if in_dims is None or out_dims is None:
            self.pin(value, f"{node.op_type} '{node.name}' has unknown shapes")
            return FIXED
        found = _track_reshape(value, in_dims, out_dims)
        if found is None:
            self.pin(value, f"{node.op_type} '{node.name}' moves channels across axes")
            return FIXED
        return found

    def reduce(self, node: onnx.NodeProto, value: object) -> object:
        if not isinstance(value, Channels):
            return value
        rank = self.rank(node.input[0])
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            array = self.const_array(node.input[1])
            axes = None if array is None else [int(a) for a in array.reshape(-1)]
        if rank is None:
            self.pin(value, f"{node.op_type} '{node.name}' has unknown rank")
            return FIXED
        if axes is None or len(axes) == 0:
            axes = list(range(rank))  # default: reduce everything
        axes = sorted(a % rank for a in axes)
        channel = rank + value.axis
        if channel in axes:
            return FIXED  # the channels are reduced away: nothing downstream reads them
        if _attr(node, "keepdims", 1):
            return value
        return value.moved(value.axis + sum(1 for a in axes if a > channel))

    def transpose(self, node: onnx.NodeProto, value: object) -> object:
        if not isinstance(value, Channels):
            return value
        rank = self.rank(node.input[0])
        perm = _attr(node, "perm", None)
        if rank is None:
            self.pin(value, f"Transpose '{node.name}' has unknown rank")
            return FIXED
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        return value.moved(perm.index(rank + value.axis) - rank)

    def gather(self, node: onnx.NodeProto, value: object) -> object:
        if not isinstance(value, Channels):
            return value
        rank, out_rank = self.rank(node.input[0]), self.rank(node.output[0])
        if rank is None or out_rank is None:
            self.pin(value, f"Gather '{node.name}' has unknown rank")
            return FIXED
        axis = _attr(node, "axis", 0) % rank
        channel = rank + value.axis
        if axis == channel:
            self.pin(value, f"Gather '{node.name}' selects channels")
            return FIXED
        if axis < channel:
            return value  # axes before the channel axis change; counted from the end it stays
        return value.moved(channel - out_rank)


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _track_reshape(value: Channels, in_dims: list[int], out_dims: list[int]) -> Channels | None:
    """Where the channel axis lands after a reshape, or None if it is split or interleaved.

    The channel axis survives when the product of the dims before it is unchanged and the
    output axis there is either the channel axis itself or the channel axis merged with the
    axes right after it (a Flatten into a Linear head: each channel becomes ``repeat``
    consecutive features).
    """
    channel = len(in_dims) + value.axis
    before = math.prod(in_dims[:channel])
    size = in_dims[channel]
    for k in range(len(out_dims)):
        if math.prod(out_dims[:k]) != before:
            continue
        merged = size
        for j in range(channel + 1, len(in_dims) + 1):
            if out_dims[k] == merged and math.prod(out_dims[k + 1:]) == math.prod(in_dims[j:]):
                return Channels(k - len(out_dims), value.segments, value.repeat * merged // size)
            if j < len(in_dims):
                merged *= in_dims[j]
    return None
