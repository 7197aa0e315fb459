"""The walk: label every tensor's channel axis in topological order, then every weight layer's role."""

from __future__ import annotations

import onnx

from otbr_onnx.layers import IN_OUT, WeightLayer
from otbr_onnx.shapes import Shapes, static_shapes
from otbr_onnx.ties.channels import Channels
from otbr_onnx.ties.group import ChannelTies, build_groups
from otbr_onnx.ties.handlers import SHAPE_OPS, handler_for
from otbr_onnx.ties.markers import CONST, FIXED, FOLLOWER, PINNED, SOURCE, Role
from otbr_onnx.ties.walk import Walk


def analyse(
    model: onnx.ModelProto, layers: list[WeightLayer], input_name: str, input_shape: tuple[int, ...],
    shapes: Shapes | None = None,
) -> ChannelTies:
    """Label every weight layer as source, follower or pinned and group the tied sources.

    ``shapes`` are the static shapes of the model's values at batch 2 (``LoadedModel.shapes``,
    from ``otbr_onnx.shapes.static_shapes``); computed here only when not given.
    """
    if shapes is None:
        shapes = static_shapes(model, input_name, input_shape)
    return _Analysis(model, layers, input_name, shapes).run()


class _Analysis(Walk):
    def __init__(self, model: onnx.ModelProto, layers: list[WeightLayer], input_name: str, shapes: Shapes) -> None:
        super().__init__(model.graph, shapes, len(layers))
        self.layers = layers
        self.layer_at = {layer.node_index: i for i, layer in enumerate(layers)}
        self.state: dict[str, object] = {name: CONST for name in self.initializers}
        self.state[input_name] = FIXED
        self.roles: list[Role] = [SOURCE] * len(layers)
        self.inputs: list[Channels | None] = [None] * len(layers)
        self.heads: set[int] = set()

    def run(self) -> ChannelTies:
        for index, node in enumerate(self.graph.node):
            ins = [self.state.get(name, FIXED) if name else CONST for name in node.input]
            if index in self.layer_at:
                outs = [self.weight_layer(self.layer_at[index], node, ins)]
            elif all(v is CONST for v in ins) or node.op_type in SHAPE_OPS:
                self.record_constant(node)
                outs = [CONST] * len(node.output)
            else:
                outs = handler_for(node.op_type)(self, node, ins)
            for name, value in zip(node.output, outs):
                self.state[name] = self.checked(name, value, node)
        for output in self.graph.output:
            value = self.state.get(output.name)
            self.pin(value, f"reaches graph output '{output.name}'")
            if isinstance(value, Channels):
                self.heads.update(value.sources())
        return self.finish()

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
        smallest = {i: min(subset) for subset in self.ties.subsets() for i in subset}
        groups = [smallest[i] if role != FOLLOWER else -1 for i, role in enumerate(self.roles)]
        pinned_groups = {groups[i] for i in self.pins if groups[i] >= 0}
        for i, g in enumerate(groups):
            if g in pinned_groups:
                self.roles[i] = PINNED
                if i not in self.pins:
                    root_reason = next(self.pins[j] for j in self.pins if groups[j] == g)
                    self.pins[i] = f"tied to a pinned layer ({root_reason})"
        return ChannelTies(self.layers, self.roles, groups, self.inputs, self.pins, self.heads,
                           build_groups(self.roles, groups, self.pins))

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
