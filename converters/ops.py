"""onnx2torch converters for ops that real exporters emit but onnx2torch 1.5.15 lacks or gets wrong.

Importing this module registers everything below in onnx2torch's own converter registry, so a
plain ``onnx2torch.convert`` picks them up. Importing it again (or a second copy of it, e.g. under
another module name) is harmless: registration skips or replaces entries instead of raising.

What is covered and why (found by exporting small CNNs and a tiny ViT with torch's legacy and
dynamo exporters at opsets 13/17/18 and the dynamo default, 20):

* ``Reduce*`` at opset 18 (and ``ReduceMax``/``ReduceMin`` at 20) take ``axes`` as an input;
  onnx2torch has no converter. Its converters for older versions are also wrong for negative axes
  with ``keepdims=0`` (ReduceMax/Min/Prod) and crash for ``ReduceSum`` over all axes with
  ``keepdims=0``, so one implementation replaces them all.
* ``Reshape(allowzero=1)``: the dynamo exporter always sets it; onnx2torch refuses it.
* ``CastLike`` (unoptimized dynamo graphs), ``Gelu`` (opset 20), ``Split`` and ``Pad`` at 18+,
  ``GroupNormalization`` (dynamo at opset >= 21), ``GlobalMaxPool``.
* ``LayerNormalization`` whose input shape inference left unknown: ``normalized_shape`` is
  taken from the scale initializer instead.
* ``Clip`` with an omitted (empty-named) or computed bound: the legacy exporter writes
  ``Clip(x, min, '')`` for ``F.normalize``; onnx2torch rejects it as "dynamic".
* Later opset versions that only widened the allowed tensor types (e.g. ``Shape``-19,
  ``Conv``-22) are mapped onto onnx2torch's existing converters, since the dynamo exporter's
  default opset (20) and higher ones otherwise fail on ops onnx2torch handles fine.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from onnx import defs
from torch import nn

from onnx2torch.node_converters import registry
from onnx2torch.node_converters.cast import OnnxCast
from onnx2torch.node_converters.clip import OnnxClip
from onnx2torch.node_converters.registry import OperationDescription, TConverter, add_converter
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)

# Marks converters defined here, so a re-import can tell its own entries from onnx2torch's.
_OURS_ATTR = "_otbr_extra_converter"

# The registry dict is private, but add_converter raises on duplicates, so replacing a buggy
# built-in converter (or re-registering on a second import) has to write to it directly.
_REGISTRY: Dict[OperationDescription, TConverter] = registry._CONVERTER_REGISTRY  # noqa: SLF001


# --------------------------------------------------------------------------------------------
# registration helpers
# --------------------------------------------------------------------------------------------


def _describe(op_type: str, version: int) -> OperationDescription:
    return OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op_type, version=version)


def registered(op_type: str, version: int) -> Optional[TConverter]:
    """The converter onnx2torch would use for ``op_type`` at exactly ``version`` (None if none)."""
    return _REGISTRY.get(_describe(op_type, version))


def register(op_type: str, versions: Iterable[int], converter: TConverter, replace: bool = False) -> None:
    """Register ``converter`` for each version of ``op_type`` (default ONNX domain).

    Never raises on an existing entry. An entry from onnx2torch itself is kept unless
    ``replace`` (we know it is wrong): a newer onnx2torch that ships its own converter for a
    version we fill in should win. An entry registered here before (a re-import) is replaced.
    """
    setattr(converter, _OURS_ATTR, True)
    for version in versions:
        description = _describe(op_type, version)
        existing = _REGISTRY.get(description)
        if existing is None:
            add_converter(operation_type=op_type, version=version)(converter)
        elif replace or getattr(existing, _OURS_ATTR, False):
            _REGISTRY[description] = converter


def _node_input(node: OnnxNode, index: int) -> Optional[str]:
    """Name of an optional input, or None when it is absent or given as '' (ONNX's "omitted")."""
    if index < len(node.input_values) and node.input_values[index]:
        return node.input_values[index]
    return None


def _const_tensor(name: Optional[str], graph: OnnxGraph) -> Optional[torch.Tensor]:
    """The value of an initializer or Constant output, or None when it is computed at run time."""
    if name is None:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _mapping(node: OnnxNode, inputs: Sequence[str]) -> OnnxMapping:
    return OnnxMapping(inputs=tuple(inputs), outputs=node.output_values)


def _torch_dim(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------------
# Reduce*
# --------------------------------------------------------------------------------------------


def _sum(x: torch.Tensor, dims: List[int], keepdim: bool) -> torch.Tensor:
    return torch.sum(x, dim=dims, keepdim=keepdim)


def _reduce_prod(x: torch.Tensor, dims: List[int], keepdim: bool) -> torch.Tensor:
    # torch.prod takes one dim at a time; going from the last dim keeps earlier indices valid.
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keepdim)
    return x


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _Reduction(NamedTuple):
    """A Reduce* op as elementwise ``before``, the reduction proper, elementwise ``after``.

    Kept apart because ONNX defines a reduction over an empty axis set (noop_with_empty_axes=1)
    as skipping only the middle step: ReduceSumSquare then squares, ReduceLogSum takes the log.
    """

    reduce: Callable[[torch.Tensor, List[int], bool], torch.Tensor]
    before: Callable[[torch.Tensor], torch.Tensor] = _identity
    after: Callable[[torch.Tensor], torch.Tensor] = _identity


_REDUCTIONS: Dict[str, _Reduction] = {
    "ReduceMean": _Reduction(lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep)),
    "ReduceSum": _Reduction(_sum),
    "ReduceMax": _Reduction(lambda x, dims, keep: torch.amax(x, dim=dims, keepdim=keep)),
    "ReduceMin": _Reduction(lambda x, dims, keep: torch.amin(x, dim=dims, keepdim=keep)),
    "ReduceProd": _Reduction(_reduce_prod),
    "ReduceL1": _Reduction(_sum, before=torch.abs),
    "ReduceL2": _Reduction(_sum, before=torch.square, after=torch.sqrt),
    "ReduceLogSum": _Reduction(_sum, after=torch.log),
    "ReduceLogSumExp": _Reduction(lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep)),
    "ReduceSumSquare": _Reduction(_sum, before=torch.square),
}


class OnnxReduce(nn.Module, OnnxToTorchModule):
    """Any ONNX Reduce* op, axes known at conversion time (``axes``) or given at run time."""

    def __init__(self, operation_type: str, axes: Optional[List[int]], keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.operation_type = operation_type
        self.axes = axes  # None: read from the forward argument
        self.keepdims = keepdims
        self.noop_with_empty_axes = noop_with_empty_axes

    def forward(self, input_tensor: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        requested = self.axes if self.axes is not None else ([] if axes is None else axes.tolist())
        if not requested and not self.noop_with_empty_axes:
            requested = list(range(input_tensor.dim()))
        # Explicit, sorted, non-negative dims: torch reads dim=[] as "all dims", and prod walks dims.
        dims = sorted({_torch_dim(int(axis), input_tensor.dim()) for axis in requested})
        reduction = _REDUCTIONS[self.operation_type]
        result = reduction.before(input_tensor)
        if dims:  # an empty set (noop_with_empty_axes, or a 0-d input) reduces nothing
            result = reduction.reduce(result, dims, self.keepdims)
        return reduction.after(result)


def _convert_reduce_axes_attribute(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Opset < 18 (and ReduceSum < 13): axes is an attribute; absent means all axes."""
    del graph
    module = OnnxReduce(
        operation_type=node.operation_type,
        axes=list(node.attributes.get("axes", [])),
        keepdims=bool(node.attributes.get("keepdims", 1)),
        noop_with_empty_axes=False,
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, node.input_values[:1]))


def _convert_reduce_axes_input(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Opset 18 (ReduceSum 13): axes is an optional input, usually a constant."""
    axes_name = _node_input(node, 1)
    axes_value = _const_tensor(axes_name, graph)
    dynamic = axes_name is not None and axes_value is None
    static_axes = None if dynamic else ([] if axes_value is None else axes_value.tolist())
    module = OnnxReduce(
        operation_type=node.operation_type,
        axes=static_axes,
        keepdims=bool(node.attributes.get("keepdims", 1)),
        noop_with_empty_axes=bool(node.attributes.get("noop_with_empty_axes", 0)),
    )
    inputs = node.input_values[:2] if dynamic else node.input_values[:1]
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, inputs))


_REDUCE_ATTRIBUTE_VERSIONS = {
    "ReduceMean": (1, 11, 13),
    "ReduceMax": (1, 11, 12, 13),
    "ReduceMin": (1, 11, 12, 13),
    "ReduceProd": (1, 11, 13),
    "ReduceL1": (1, 11, 13),
    "ReduceL2": (1, 11, 13),
    "ReduceLogSum": (1, 11, 13),
    "ReduceLogSumExp": (1, 11, 13),
    "ReduceSumSquare": (1, 11, 13),
    "ReduceSum": (1, 11),
}
_REDUCE_INPUT_VERSIONS = {op: (18,) for op in _REDUCE_ATTRIBUTE_VERSIONS if op != "ReduceSum"}
_REDUCE_INPUT_VERSIONS.update({"ReduceSum": (13,), "ReduceMax": (18, 20), "ReduceMin": (18, 20)})

for _op, _versions in _REDUCE_ATTRIBUTE_VERSIONS.items():
    register(_op, _versions, _convert_reduce_axes_attribute, replace=True)
for _op, _versions in _REDUCE_INPUT_VERSIONS.items():
    register(_op, _versions, _convert_reduce_axes_input, replace=True)


# --------------------------------------------------------------------------------------------
# Cast / CastLike
# --------------------------------------------------------------------------------------------


class OnnxCastLike(nn.Module, OnnxToTorchModule):
    """CastLike: cast the input to the element type of the second input."""

    def forward(self, input_tensor: torch.Tensor, target_type: torch.Tensor) -> torch.Tensor:
        return input_tensor.to(target_type.dtype)


def _convert_cast_like(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    return OperationConverterResult(torch_module=OnnxCastLike(), onnx_mapping=onnx_mapping_from_node(node))


def _convert_cast(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    # Cast >= 19 only adds float8/int4/... types and 'saturate' (which only affects float8);
    # OnnxCast refuses the types torch cannot hold.
    del graph
    return OperationConverterResult(
        torch_module=OnnxCast(node.attributes["to"]), onnx_mapping=onnx_mapping_from_node(node)
    )


register("CastLike", (15, 19, 21, 23, 24, 25), _convert_cast_like)
register("Cast", (19, 21, 23, 24, 25), _convert_cast)


# --------------------------------------------------------------------------------------------
# Reshape
# --------------------------------------------------------------------------------------------


class OnnxReshapeAllowZero(nn.Module, OnnxToTorchModule):
    """Reshape with allowzero=1: a 0 in ``shape`` is a real zero-sized dim, not "copy the input's"."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(input_tensor, [int(size) for size in shape.tolist()])


def _convert_reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    # allowzero=0 keeps onnx2torch's own module (it also knows how to re-export itself to ONNX).
    module = OnnxReshapeAllowZero() if node.attributes.get("allowzero", 0) else OnnxReshape()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


# 14 replaces onnx2torch's converter, which raises on allowzero=1 (dynamo always sets it).
register("Reshape", (14,), _convert_reshape, replace=True)
register("Reshape", (19, 21, 23, 24, 25), _convert_reshape)


# --------------------------------------------------------------------------------------------
# Gelu
# --------------------------------------------------------------------------------------------


class OnnxGelu(nn.Module, OnnxToTorchModule):
    """Gelu-20; ``approximate`` is 'none' (erf) or 'tanh', the same names torch uses."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return F.gelu(input_tensor, approximate=self.approximate)


def _convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f'Gelu with approximate="{approximate}" is not implemented')
    return OperationConverterResult(torch_module=OnnxGelu(approximate), onnx_mapping=onnx_mapping_from_node(node))


register("Gelu", (20,), _convert_gelu)


# --------------------------------------------------------------------------------------------
# Split (18: 'num_outputs' attribute, uneven last chunk allowed)
# --------------------------------------------------------------------------------------------


class OnnxSplit18(nn.Module, OnnxToTorchModule):
    """Split-18: explicit sizes from the ``split`` input, else ceil(len / num_outputs) chunks."""

    def __init__(self, axis: int, num_outputs: int):
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs

    def forward(self, input_tensor: torch.Tensor, split: Optional[torch.Tensor] = None):
        if split is not None:
            sizes = [int(size) for size in split.tolist()]
        else:
            chunk = math.ceil(input_tensor.shape[self.axis] / self.num_outputs)
            sizes = [chunk] * (self.num_outputs - 1)
            sizes.append(input_tensor.shape[self.axis] - chunk * (self.num_outputs - 1))
        parts = torch.split(input_tensor, sizes, dim=self.axis)
        # onnx2torch indexes into the result only when the node has several outputs.
        return parts if self.num_outputs > 1 else parts[0]


def _convert_split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    num_outputs = len(node.output_values)
    module = OnnxSplit18(axis=node.attributes.get("axis", 0), num_outputs=num_outputs)
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


register("Split", (18,), _convert_split)


# --------------------------------------------------------------------------------------------
# Pad (18: optional 'axes' input; 19: 'wrap' mode)
# --------------------------------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _full_onnx_pads(pads: List[int], axes: Optional[List[int]], rank: int) -> List[int]:
    """Expand pads given for ``axes`` to ONNX's [begin_0..begin_r-1, end_0..end_r-1] for all dims."""
    if axes is None:
        return pads
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        dim = _torch_dim(axis, rank)
        full[dim], full[dim + rank] = pads[i], pads[i + len(axes)]
    return full


def _torch_pads(onnx_pads: List[int], rank: int) -> List[int]:
    """ONNX pads -> F.pad order (last dim first), dropping leading dims that are not padded.

    Dropping them matters: torch's reflect/replicate/circular modes only pad trailing dims.
    """
    pairs = [(onnx_pads[dim], onnx_pads[dim + rank]) for dim in range(rank)]
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)
    return [size for begin_end in reversed(pairs) for size in begin_end]


class OnnxPad18(nn.Module, OnnxToTorchModule):
    """Pad-18+: pads (and optional axes, constant value) as inputs; negative pads crop."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(
        self,
        input_tensor: torch.Tensor,
        pads: torch.Tensor,
        constant_value: Optional[torch.Tensor] = None,
        axes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        rank = input_tensor.dim()
        onnx_pads = _full_onnx_pads(pads.tolist(), None if axes is None else axes.tolist(), rank)
        torch_pads = _torch_pads(onnx_pads, rank)
        if not torch_pads:
            return input_tensor
        if self.mode != "constant":
            return F.pad(input_tensor, torch_pads, mode=self.mode)
        value = 0.0 if constant_value is None or constant_value.numel() == 0 else constant_value.item()
        return F.pad(input_tensor, torch_pads, mode="constant", value=value)


def _convert_pad(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f'Pad mode "{mode}" is not implemented')
    return OperationConverterResult(torch_module=OnnxPad18(_PAD_MODES[mode]), onnx_mapping=onnx_mapping_from_node(node))


register("Pad", (18, 19, 21, 23, 24, 25), _convert_pad)


# --------------------------------------------------------------------------------------------
# Clip (11-13) with omitted or computed bounds
# --------------------------------------------------------------------------------------------


class OnnxClipDynamic(nn.Module, OnnxToTorchModule):
    """Clip whose bounds are only known at run time."""

    def forward(
        self,
        input_tensor: torch.Tensor,
        min: Optional[torch.Tensor] = None,  # noqa: A002 - ONNX input names, used as kwargs
        max: Optional[torch.Tensor] = None,  # noqa: A002
    ) -> torch.Tensor:
        return torch.clamp(input_tensor, min=min, max=max)


def _clip_static_module(min_val: Optional[float], max_val: Optional[float]) -> nn.Module:
    # Same module choice as onnx2torch, so ReLU/ReLU6 stay recognisable (e.g. for fusion).
    if min_val is None and max_val is None:
        return nn.Identity()
    if min_val == 0 and max_val is None:
        return nn.ReLU()
    if min_val == 0 and max_val == 6:
        return nn.ReLU6()
    return OnnxClip(min_val=min_val, max_val=max_val)


def _convert_clip(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    min_name, max_name = _node_input(node, 1), _node_input(node, 2)
    min_value, max_value = _const_tensor(min_name, graph), _const_tensor(max_name, graph)
    dynamic = (min_name is not None and min_value is None) or (max_name is not None and max_value is None)
    if dynamic:
        return OperationConverterResult(torch_module=OnnxClipDynamic(), onnx_mapping=onnx_mapping_from_node(node))
    module = _clip_static_module(
        None if min_value is None else float(min_value),
        None if max_value is None else float(max_value),
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, node.input_values[:1]))


# onnx2torch treats an omitted bound ('' as input name) as a computed one and refuses the node.
register("Clip", (11, 12, 13), _convert_clip, replace=True)


# --------------------------------------------------------------------------------------------
# GroupNormalization (18: per-group scale/bias; 21: per-channel) and GlobalMaxPool
# --------------------------------------------------------------------------------------------


class OnnxGroupNorm(nn.Module, OnnxToTorchModule):
    """GroupNormalization; scale/bias stay graph inputs so they remain ordinary initializers."""

    def __init__(self, num_groups: int, epsilon: float, per_group_affine: bool):
        super().__init__()
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.per_group_affine = per_group_affine

    def forward(self, input_tensor: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.per_group_affine:  # opset 18: one scale/bias per group, shared by its channels
            channels_per_group = input_tensor.shape[1] // self.num_groups
            scale = scale.repeat_interleave(channels_per_group)
            bias = bias.repeat_interleave(channels_per_group)
        return F.group_norm(input_tensor, self.num_groups, scale, bias, self.epsilon)


def _group_norm_converter(per_group_affine: bool) -> TConverter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        del graph
        module = OnnxGroupNorm(
            num_groups=node.attributes["num_groups"],
            epsilon=node.attributes.get("epsilon", 1e-5),
            per_group_affine=per_group_affine,
        )
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    return convert


register("GroupNormalization", (18,), _group_norm_converter(per_group_affine=True))
register("GroupNormalization", (21,), _group_norm_converter(per_group_affine=False))


class OnnxGlobalMaxPool(nn.Module, OnnxToTorchModule):
    """GlobalMaxPool: max over every spatial dim, keeping them as size 1."""

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return torch.amax(input_tensor, dim=list(range(2, input_tensor.dim())), keepdim=True)


def _convert_global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    return OperationConverterResult(torch_module=OnnxGlobalMaxPool(), onnx_mapping=onnx_mapping_from_node(node))


register("GlobalMaxPool", (1, 22), _convert_global_max_pool)


# --------------------------------------------------------------------------------------------
# AveragePool 19/22 ('dilations' added) -> onnx2torch's AveragePool-11 when undilated
# --------------------------------------------------------------------------------------------


def _convert_average_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if any(dilation != 1 for dilation in node.attributes.get("dilations", [])):
        raise NotImplementedError("AveragePool with dilations is not implemented (torch has no dilated avg pool)")
    return _REGISTRY[_describe("AveragePool", 11)](node, graph)


register("AveragePool", (19, 22), _convert_average_pool)


# --------------------------------------------------------------------------------------------
# LayerNormalization-17: normalized_shape from the scale, not from shape inference
# --------------------------------------------------------------------------------------------


def _original_layer_norm() -> TConverter:
    """onnx2torch's own LayerNormalization-17 converter (also after a re-import of this module)."""
    existing = registered("LayerNormalization", 17)
    return getattr(existing, "_otbr_replaces", existing)


def _normalized_rank(axis: int, node: OnnxNode, graph: OnnxGraph) -> Optional[int]:
    """How many trailing axes a LayerNormalization normalises, or None if unknown."""
    if axis < 0:
        return -axis
    info = graph.value_info.get(node.input_values[0])
    dims = info.type.tensor_type.shape.dim if info is not None and info.type.tensor_type.HasField("shape") else None
    return len(dims) - axis if dims else None


def _convert_layer_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """``nn.LayerNorm`` whose ``normalized_shape`` is the scale's shape.

    onnx2torch reads ``normalized_shape`` from the input's inferred shape. Where inference left
    it unknown (the legacy exporter computes an MLP-Mixer's token reshape through ``Shape``
    chains), it builds ``LayerNorm([0])``, which fails on the first call. The scale initializer
    holds the normalised shape itself, whatever the input shape inference found.
    """
    axis = node.attributes.get("axis", -1)
    scale_name = node.input_values[1]
    bias_name = node.input_values[2] if len(node.input_values) > 2 and node.input_values[2] else None
    if scale_name not in graph.initializers or (bias_name and bias_name not in graph.initializers):
        return _original_layer_norm()(node, graph)
    scale = graph.initializers[scale_name].to_torch()
    bias = graph.initializers[bias_name].to_torch() if bias_name else None
    if _normalized_rank(axis, node, graph) != scale.dim() or (bias is not None and bias.shape != scale.shape):
        return _original_layer_norm()(node, graph)
    module = nn.LayerNorm(tuple(scale.shape), eps=node.attributes.get("epsilon", 1e-5), bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(scale)
        if bias is not None:
            module.bias.copy_(bias)
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, (node.input_values[0],)))


_convert_layer_norm._otbr_replaces = _original_layer_norm()  # noqa: SLF001 - read back on a re-import
register("LayerNormalization", (17,), _convert_layer_norm, replace=True)


# --------------------------------------------------------------------------------------------
# Versions that only widened the allowed types: reuse onnx2torch's converter as is
# --------------------------------------------------------------------------------------------

# op -> (onnx2torch's newest version, later versions whose changelog entry is "more types":
# float8 in 19/20, int4 in 21, bfloat16 in 22, float4 in 23, float8e8m0 in 24, int2 in 25).
TYPE_ONLY_BUMPS: Dict[str, tuple] = {
    "Constant": (13, (19, 21, 23, 24, 25)),
    "ConstantOfShape": (9, (20, 21, 23, 24, 25)),
    "Identity": (16, (19, 21, 23, 24, 25)),
    "Shape": (15, (19, 21, 23, 24, 25)),
    "Flatten": (13, (21, 23, 24, 25)),
    "Transpose": (13, (21, 23, 24, 25)),
    "Unsqueeze": (13, (21, 23, 24, 25)),
    "Squeeze": (21, (23, 24, 25)),
    "Equal": (13, (19,)),
    "GreaterOrEqual": (12, (16,)),
    "LessOrEqual": (12, (16,)),
    "IsInf": (10, (20,)),
    "IsNaN": (13, (20,)),
    "Conv": (11, (22,)),
    "ConvTranspose": (11, (22,)),
    "MaxPool": (12, (22,)),
    "GlobalAveragePool": (1, (22,)),
    "InstanceNormalization": (6, (22,)),
    "Dropout": (13, (22,)),
    "HardSwish": (14, (22,)),
    "HardSigmoid": (6, (22,)),
    "Elu": (6, (22,)),
    "Selu": (6, (22,)),
    "Softplus": (1, (22,)),
    "Softsign": (1, (22,)),
    "Round": (11, (22,)),
}


def _signature(op_type: str, version: int) -> Optional[tuple]:
    """Attribute and input/output names of the schema in force at ``version`` (None if unknown)."""
    try:
        schema = defs.get_schema(op_type, max_inclusive_version=version)
    except defs.SchemaError:
        return None
    if schema.since_version != version:
        return None
    return (
        tuple(sorted(schema.attributes)),
        tuple((param.name, int(param.option)) for param in schema.inputs),
        tuple(param.name for param in schema.outputs),
    )


def _alias_type_only_bumps() -> None:
    for op_type, (source, targets) in TYPE_ONLY_BUMPS.items():
        converter = _REGISTRY.get(_describe(op_type, source))
        if converter is None:
            continue
        for target in targets:
            # Guard against a wrong table entry: an interface change means new semantics.
            if _signature(op_type, target) == _signature(op_type, source):
                _register_alias(op_type, target, converter)


def _register_alias(op_type: str, version: int, converter: TConverter) -> None:
    # Not via register: that would tag onnx2torch's own function as ours.
    description = _describe(op_type, version)
    if description not in _REGISTRY:
        add_converter(operation_type=op_type, version=version)(converter)


_alias_type_only_bumps()
