"""How each op moves the channel axis: a table ``{op_type: handler}``.

A handler takes the walk, the node and what each input carries (``Channels``, ``FIXED`` or
``CONST``) and returns what each output carries; where it cannot follow the channels it pins
their sources (``walk.pin``) and returns ``FIXED``. An op missing from ``HANDLERS`` gets
``untracked``: its channel mapping is unknown, so every source flowing into it is pinned.
Weight layers and constant subgraphs never reach a handler (see ``analysis``).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from otbr_onnx.layers import node_attr
from otbr_onnx.ties.channels import Channels, track_reshape
from otbr_onnx.ties.markers import CONST, FIXED
from otbr_onnx.ties.walk import Walk

Handler = Callable[[Walk, onnx.NodeProto, list], list]

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
SPATIAL = {"Pad", "Resize", "Upsample", "Expand"}  # change other axes only, checked against shapes
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}
SPATIAL_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"}
SHAPE_OPS = {"Shape", "Size"}  # their outputs are constants, whatever their input carries


def _single(handler: Callable[[Walk, onnx.NodeProto, list], object]) -> Handler:
    """A handler for a one-output op, from a function returning that output's label."""
    def wrapped(walk: Walk, node: onnx.NodeProto, ins: list) -> list:
        return [handler(walk, node, ins)]
    wrapped.__name__ = wrapped.__qualname__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def untracked(walk: Walk, node: onnx.NodeProto, ins: list) -> list:
    """An op whose channel mapping is not tracked: pin whatever flows in."""
    for value in ins:
        if value is not CONST:
            walk.pin(value, f"flows into {node.op_type} '{node.name}', whose channel mapping is not tracked")
    return [FIXED] * len(node.output)


def channelwise(walk: Walk, node: onnx.NodeProto, ins: list) -> list:
    """Channel ``c`` out depends only on channel ``c`` in (and on constant parameters)."""
    value = ins[0]
    others = [v for v in ins[1:] if v is not CONST]
    if others:
        for v in [value] + others:
            walk.pin(v, f"{node.op_type} '{node.name}' takes a non-constant parameter")
        return [FIXED] * len(node.output)
    if isinstance(value, Channels):
        in_dims, out_dims = walk.shapes.get(node.input[0]), walk.shapes.get(node.output[0])
        if in_dims is None or out_dims is None or len(in_dims) != len(out_dims) \
                or in_dims[value.axis] != out_dims[value.axis]:
            walk.pin(value, f"{node.op_type} '{node.name}' may change the channel axis")
            return [FIXED] * len(node.output)
    # extra outputs (BatchNorm training stats, Dropout mask) carry no channels we track
    return [value] + [FIXED] * (len(node.output) - 1)


@_single
def elementwise(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """Operands combined channel by channel: their sources are tied (must share one plan)."""
    tracked = [v for v in ins if isinstance(v, Channels)]
    fixed = [name for name, v in zip(node.input, ins) if v is FIXED]
    if not tracked:
        return FIXED
    first = tracked[0]
    for name in fixed:
        dims = walk.shapes.get(name)
        # a fixed operand of size 1 on the channel axis (a spatial mask) touches no channel
        if dims is None or (-first.axis <= len(dims) and dims[first.axis] != 1):
            for v in tracked:
                walk.pin(v, f"added to an untracked tensor at {node.op_type} '{node.name}'")
            return FIXED
    for other in tracked[1:]:
        same_shape = (other.axis == first.axis and other.repeat == first.repeat
                      and [n for _, n in other.segments] == [n for _, n in first.segments])
        if not same_shape:
            for v in tracked:
                walk.pin(v, f"{node.op_type} '{node.name}' combines differently laid-out channels")
            return FIXED
        for (a, _), (b, _) in zip(first.segments, other.segments):
            if a is not None and b is not None:
                walk.tie(a, b)
            elif a is not None or b is not None:
                walk.pins.setdefault(a if a is not None else b,
                                     f"{node.op_type} '{node.name}' ties it to fixed channels")
    return first  # negative axes survive right-aligned broadcasting


@_single
def pool(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """Pooling over spatial axes keeps the channels; over the channel axis it mixes them."""
    value = ins[0]
    if not isinstance(value, Channels):
        return value
    rank = walk.rank(node.input[0])
    if rank is None or rank + value.axis >= 2:  # pooling over the channel axis itself
        walk.pin(value, f"{node.op_type} '{node.name}' pools over the channel axis")
        return FIXED
    return value


@_single
def concat(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """Along the channel axis: the segments follow one another; along another axis: a tie."""
    out_rank = walk.rank(node.output[0])
    axis = node_attr(node, "axis", 0)
    if out_rank is None:
        for v in ins:
            walk.pin(v, f"Concat '{node.name}' has unknown rank")
        return FIXED
    axis = axis - out_rank if axis >= 0 else axis
    tracked = [v for v in ins if isinstance(v, Channels)]
    if not tracked:
        return FIXED
    if any(v.axis != axis for v in tracked):
        return elementwise(walk, node, ins)[0]
    repeat = tracked[0].repeat
    segments: list[tuple[int | None, int]] = []
    for name, v in zip(node.input, ins):
        if isinstance(v, Channels):
            if v.repeat != repeat:
                for t in tracked:
                    walk.pin(t, f"Concat '{node.name}' joins channels of different spatial size")
                return FIXED
            segments.extend(v.segments)
        else:
            dims = walk.shapes.get(name)
            if dims is None or dims[axis] <= 0 or dims[axis] % repeat:
                for t in tracked:
                    walk.pin(t, f"Concat '{node.name}' joins an operand of unknown size")
                return FIXED
            segments.append((None, dims[axis] // repeat))
    return Channels(axis, tuple(segments), repeat)


@_single
def reshape(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """The channel axis survives a reshape that neither splits nor interleaves it."""
    value = ins[0]
    if not isinstance(value, Channels):
        return value
    in_dims, out_dims = walk.dims(node.input[0]), walk.dims(node.output[0])
    if in_dims is None or out_dims is None:
        walk.pin(value, f"{node.op_type} '{node.name}' has unknown shapes")
        return FIXED
    found = track_reshape(value, in_dims, out_dims)
    if found is None:
        walk.pin(value, f"{node.op_type} '{node.name}' moves channels across axes")
        return FIXED
    return found


@_single
def reduce(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """Reducing the channel axis away ends the channels; reducing others may move the axis."""
    value = ins[0]
    if not isinstance(value, Channels):
        return value
    rank = walk.rank(node.input[0])
    axes = node_attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        array = walk.const_array(node.input[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if rank is None:
        walk.pin(value, f"{node.op_type} '{node.name}' has unknown rank")
        return FIXED
    if axes is None or len(axes) == 0:
        axes = list(range(rank))  # default: reduce everything
    axes = sorted(a % rank for a in axes)
    channel = rank + value.axis
    if channel in axes:
        return FIXED  # the channels are reduced away: nothing downstream reads them
    if node_attr(node, "keepdims", 1):
        return value
    return value.moved(value.axis + sum(1 for a in axes if a > channel))


@_single
def transpose(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """The channel axis goes where ``perm`` sends it."""
    value = ins[0]
    if not isinstance(value, Channels):
        return value
    rank = walk.rank(node.input[0])
    perm = node_attr(node, "perm", None)
    if rank is None:
        walk.pin(value, f"Transpose '{node.name}' has unknown rank")
        return FIXED
    perm = list(perm) if perm is not None else list(reversed(range(rank)))
    return value.moved(perm.index(rank + value.axis) - rank)


@_single
def gather(walk: Walk, node: onnx.NodeProto, ins: list) -> object:
    """Gathering on another axis keeps the channels; on the channel axis it selects them."""
    value = ins[0]
    if not isinstance(value, Channels):
        return value
    rank, out_rank = walk.rank(node.input[0]), walk.rank(node.output[0])
    if rank is None or out_rank is None:
        walk.pin(value, f"Gather '{node.name}' has unknown rank")
        return FIXED
    axis = node_attr(node, "axis", 0) % rank
    channel = rank + value.axis
    if axis == channel:
        walk.pin(value, f"Gather '{node.name}' selects channels")
        return FIXED
    if axis < channel:
        return value  # axes before the channel axis change; counted from the end it stays
    return value.moved(channel - out_rank)


HANDLERS: dict[str, Handler] = {
    **{op: channelwise for op in CHANNELWISE | SPATIAL},
    **{op: elementwise for op in ELEMENTWISE},
    **{op: pool for op in SPATIAL_POOLS},
    **{op: reshape for op in RESHAPES},
    **{op: reduce for op in REDUCES},
    "Concat": concat,
    "Transpose": transpose,
    "Gather": gather,
}


def handler_for(op_type: str) -> Handler:
    return HANDLERS.get(op_type, untracked)
