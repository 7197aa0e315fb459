"""Weight layers: the ONNX nodes whose constant weights hold "neurons" (output channels).

Every method stage works on one canonical view of a weight, ``rows``: shape
``[out, in, *kernel]``, one row per neuron, with the input-channel axis second. ``to_rows`` and
``from_rows`` convert between that view and the tensor exactly as the ONNX initializer stores it,
so nothing downstream needs to know about ``transB`` or MatMul operand order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto

from otbr_onnx.errors import UnsupportedModelError

# How an initializer is laid out, relative to rows = [out, in, ...].
CONV = "conv"  # Conv weight [out, in/groups, *k]: already rows
CONV_T = "conv_t"  # ConvTranspose weight [in, out, *k] (groups 1): neurons on axis 1
OUT_IN = "out_in"  # Gemm transB=1, or MatMul W @ X with W [out, in]
IN_OUT = "in_out"  # Gemm transB=0, or MatMul X @ W with W [in, out]


@dataclass(frozen=True)
class WeightLayer:
    """One node with a constant weight, and where its neurons live."""

    node_index: int  # position in graph.node
    node_name: str
    op_type: str
    weight: str  # initializer name
    bias: str | None  # initializer holding one value per neuron, if any
    layout: str  # CONV, OUT_IN or IN_OUT
    out_channels: int
    in_channels: int  # per group for Conv
    groups: int
    data_input: int  # which node input carries the activations
    kernel: tuple[int, ...] = ()  # spatial kernel of a Conv
    # A bias whose storage other nodes read too (torch's exporter feeds a zero BatchNorm bias to
    # convs through Identity): the layer is cleaned, its bias left as it is.
    shared_bias: str | None = None

    @property
    def label(self) -> str:
        return self.node_name or f"{self.op_type}#{self.node_index}"

    @property
    def is_conv_like(self) -> bool:
        """Conv or ConvTranspose: channels on axis 1 of an (N, C, *spatial) tensor."""
        return self.layout in (CONV, CONV_T)

    @property
    def is_depthwise(self) -> bool:
        return self.op_type == "Conv" and self.groups > 1 and self.in_channels == 1 and self.out_channels == self.groups

    @property
    def is_grouped(self) -> bool:
        return self.op_type == "Conv" and self.groups > 1 and not self.is_depthwise


def to_rows(layer: WeightLayer, weight: np.ndarray) -> np.ndarray:
    """ONNX layout -> rows ``[out, in, ...]``."""
    if layer.layout == IN_OUT:
        return weight.T
    if layer.layout == CONV_T:
        return np.swapaxes(weight, 0, 1)
    return weight


def from_rows(layer: WeightLayer, rows: np.ndarray) -> np.ndarray:
    """Rows ``[out, in, ...]`` -> ONNX layout (inverse of ``to_rows``)."""
    return np.ascontiguousarray(to_rows(layer, rows))  # both swaps are their own inverse


@dataclass(frozen=True)
class SkippedLayer:
    node_name: str
    op_type: str
    reason: str


def find_weight_layers(model: onnx.ModelProto, shared: dict[str, int] | None = None
                       ) -> tuple[list[WeightLayer], list[SkippedLayer]]:
    """All Conv / ConvTranspose / Gemm / MatMul nodes with a constant float weight, in graph order.

    ``model`` is the float32 working copy (``LoadedModel.working``), where every weight is an
    initializer; ``shared`` (``WeightStorage.shared``) names the slots whose storage in the
    original graph other nodes read too (through Identity, or directly).

    A layer whose weight is read by more than one node is skipped (left untouched): changing it
    for one reader would silently change the others. A shared bias is kept as it is while the
    layer's weight is cleaned (``shared_bias``). A raw model whose only weights live in
    ``Constant`` nodes (Paddle's exporter writes them so) is refused here, naming a node: the
    generic "no weight layer" answer would wrongly suggest it has no weights at all.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    constants = _constant_outputs(graph)
    uses = Counter(name for node in graph.node for name in node.input)
    layers: list[WeightLayer] = []
    skipped: list[SkippedLayer] = []
    for index, node in enumerate(graph.node):
        found = _describe(index, node, inits)
        if found is None or isinstance(found, SkippedLayer):
            found = _constant_weight(node, constants) or found
        if found is None:
            continue
        if isinstance(found, SkippedLayer):
            skipped.append(found)
            continue
        readers = {n: max(uses[n], (shared or {}).get(n, 0)) for n in (found.weight, found.bias) if n}
        if readers[found.weight] > 1:
            skipped.append(SkippedLayer(found.label, node.op_type,
                                        f"initializer '{found.weight}' is shared with other nodes"))
            continue
        if found.bias and readers[found.bias] > 1:
            found = replace(found, bias=None, shared_bias=found.bias)
        layers.append(found)
    if not layers:
        _refuse_constant_weights(skipped)
    return layers, skipped


def reachable_layers(
    model: onnx.ModelProto, layers: list[WeightLayer], skipped: list[SkippedLayer], output_name: str | None = None
) -> tuple[list[WeightLayer], list[SkippedLayer]]:
    """``layers`` whose output values reach ``output_name`` (default: any graph output), and
    ``skipped`` plus one entry for every other layer.

    A dead layer gets no gradient from the logits, so random unlearning cannot move it (torch
    then stops: "element 0 of tensors does not require grad"), and pruning it changes nothing
    the model answers. Skipping keeps it untouched and the report says why.
    """
    targets = [output_name] if output_name else [v.name for v in model.graph.output]
    live = _live_nodes(model.graph, targets)
    where = f"the output '{output_name}'" if output_name else "any graph output"
    dead = [SkippedLayer(layer.label, layer.op_type, f"its output does not reach {where}")
            for layer in layers if layer.node_index not in live]
    kept = [layer for layer in layers if layer.node_index in live]
    if layers and not kept:
        raise UnsupportedModelError(
            f"none of the {len(layers)} weight layers reaches {where} (e.g. {dead[0].op_type} '{dead[0].node_name}'); "
            "nothing to clean"
        )
    return kept, [*skipped, *dead]


# Ops whose output depends on the shape of their input only, not its values: a weight seen
# only through them gets no gradient either.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _live_nodes(graph: onnx.GraphProto, targets: list[str]) -> set[int]:
    """Indices of the nodes whose output values the ``targets`` depend on."""
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    live: set[int] = set()
    pending = list(targets)
    while pending:
        index = producers.get(pending.pop())
        if index is None or index in live:
            continue
        live.add(index)
        node = graph.node[index]
        if node.op_type not in _SHAPE_ONLY_OPS:
            pending.extend(_value_inputs(node))
    return live


def _value_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, with the outer-scope names its If / Loop bodies read."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
            names += [name for inner in sub.node for name in _value_inputs(inner)]
    return names


_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONSTANT_NODE_REASON = "reads its weight from Constant node"


def _constant_outputs(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {node.output[0]: node for node in graph.node if node.op_type == "Constant" and node.output}


def _constant_weight(node: onnx.NodeProto, constants: dict[str, onnx.NodeProto]) -> SkippedLayer | None:
    """A weight op whose weight is a ``Constant`` node's output: skipped, with the reason.

    Write-back edits initializers only, and onnx2torch cannot convert such a node (it looks the
    weight up among the initializers), so these weights are left as they are.
    """
    if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
        return None
    position = 0 if node.op_type == "MatMul" and node.input[0] in constants else 1
    source = constants.get(node.input[position])
    if source is None:
        return None
    return SkippedLayer(node.name, node.op_type,
                        f"{CONSTANT_NODE_REASON} '{source.name or source.output[0]}', not an initializer")


def _refuse_constant_weights(skipped: list[SkippedLayer]) -> None:
    held = [s for s in skipped if s.reason.startswith(CONSTANT_NODE_REASON)]
    if held:
        first = held[0]
        raise UnsupportedModelError(
            f"all {len(held)} weight layers keep their weights in Constant nodes instead of initializers "
            f"(as Paddle's exporter writes them; e.g. {first.op_type} '{first.node_name}'); "
            "re-export with weights as initializers"
        )


def node_attr(node: onnx.NodeProto, name: str, default):
    """The value of attribute ``name`` of ``node``, or ``default`` where it is absent."""
    try:
        return onnx.helper.get_node_attr_value(node, name)
    except ValueError:  # absent (or, in a graph the checker would refuse, given twice)
        return default


def _float_init(inits: dict, name: str) -> TensorProto | None:
    tensor = inits.get(name)
    if tensor is None or tensor.data_type != TensorProto.FLOAT:
        return None
    return tensor


def _describe(index: int, node: onnx.NodeProto, inits: dict) -> WeightLayer | SkippedLayer | None:
    if node.op_type == "Conv":
        return _describe_conv(index, node, inits)
    if node.op_type == "ConvTranspose":
        return _describe_conv_transpose(index, node, inits)
    if node.op_type == "Gemm":
        return _describe_gemm(index, node, inits)
    if node.op_type == "MatMul":
        return _describe_matmul(index, node, inits)
    return None


def _bias_name(inits: dict, name: str | None, out_channels: int) -> str | None:
    """The bias initializer if it holds exactly one value per neuron, else None."""
    if not name:
        return None
    tensor = _float_init(inits, name)
    if tensor is None or list(tensor.dims) != [out_channels]:
        return None
    return name


def _conv_weight(node: onnx.NodeProto, inits: dict, neuron_axis: int) -> tuple[list[int], str | None] | SkippedLayer:
    """Weight dims and bias name of a Conv/ConvTranspose, or why the node cannot be cleaned."""
    if len(node.input) < 2 or _float_init(inits, node.input[1]) is None:
        return SkippedLayer(node.name, node.op_type, "weight is not a float32 initializer")
    dims = list(inits[node.input[1]].dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and _bias_name(inits, bias, dims[neuron_axis]) is None:
        return SkippedLayer(node.name, node.op_type, "bias is not a per-channel float32 initializer")
    return dims, bias


def _describe_conv(index: int, node: onnx.NodeProto, inits: dict) -> WeightLayer | SkippedLayer | None:
    found = _conv_weight(node, inits, neuron_axis=0)
    if isinstance(found, SkippedLayer):
        return found
    dims, bias = found
    return WeightLayer(
        node_index=index, node_name=node.name, op_type="Conv", weight=node.input[1], bias=bias,
        layout=CONV, out_channels=dims[0], in_channels=dims[1], groups=int(node_attr(node, "group", 1)), data_input=0,
        kernel=tuple(dims[2:]),
    )


def _describe_conv_transpose(index: int, node: onnx.NodeProto, inits: dict) -> WeightLayer | SkippedLayer:
    """ConvTranspose: weight ``[C_in, C_out / groups, *k]``, so its neurons are axis 1."""
    if len(node.input) < 2 or _float_init(inits, node.input[1]) is None:
        return SkippedLayer(node.name, node.op_type, "weight is not a float32 initializer")
    groups = int(node_attr(node, "group", 1))
    if groups != 1:
        # with groups the neurons of group g are axis 1 of rows g*C_in/g.. only: not one matrix
        return SkippedLayer(node.name, node.op_type, f"grouped ConvTranspose (group={groups}) is not supported")
    found = _conv_weight(node, inits, neuron_axis=1)
    if isinstance(found, SkippedLayer):
        return found
    dims, bias = found
    return WeightLayer(
        node_index=index, node_name=node.name, op_type="ConvTranspose", weight=node.input[1], bias=bias,
        layout=CONV_T, out_channels=dims[1], in_channels=dims[0], groups=1, data_input=0, kernel=tuple(dims[2:]),
    )


def _describe_gemm(index: int, node: onnx.NodeProto, inits: dict) -> WeightLayer | SkippedLayer | None:
    if _float_init(inits, node.input[1]) is None:
        return None  # activation x activation: not a weight layer
    if node_attr(node, "transA", 0):
        return SkippedLayer(node.name, node.op_type, "transA=1 is not supported")
    dims = list(inits[node.input[1]].dims)
    trans_b = bool(node_attr(node, "transB", 0))
    out_channels, in_channels = (dims[0], dims[1]) if trans_b else (dims[1], dims[0])
    bias_input = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias_input is not None and bias_input not in inits:
        return SkippedLayer(node.name, node.op_type, "bias C is not an initializer")
    return WeightLayer(
        node_index=index, node_name=node.name, op_type="Gemm", weight=node.input[1],
        bias=_bias_name(inits, bias_input, out_channels), layout=OUT_IN if trans_b else IN_OUT,
        out_channels=out_channels, in_channels=in_channels, groups=1, data_input=0,
    )


def _describe_matmul(index: int, node: onnx.NodeProto, inits: dict) -> WeightLayer | SkippedLayer | None:
    left, right = (_float_init(inits, name) for name in node.input[:2])
    if (left is None) == (right is None):
        return None  # two activations (attention) or two constants: no neurons to clean
    weight = right if right is not None else left
    if len(weight.dims) != 2:
        return SkippedLayer(node.name, node.op_type, f"constant operand has rank {len(weight.dims)}, expected 2")
    rows_in, cols = weight.dims
    if right is not None:  # X @ W, W [in, out]
        return WeightLayer(
            node_index=index, node_name=node.name, op_type="MatMul", weight=node.input[1], bias=None,
            layout=IN_OUT, out_channels=cols, in_channels=rows_in, groups=1, data_input=0,
        )
    return WeightLayer(  # W @ X, W [out, in]
        node_index=index, node_name=node.name, op_type="MatMul", weight=node.input[0], bias=None,
        layout=OUT_IN, out_channels=rows_in, in_channels=cols, groups=1, data_input=1,
    )
