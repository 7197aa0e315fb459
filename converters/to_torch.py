"""ONNX -> PyTorch with onnx2torch, and where each weight initializer lives in the result.

onnx2torch names each submodule after its ONNX node, but it stores a weight in one of three
ways: as the ``weight``/``bias`` parameter of an ``nn.Conv*`` (same layout), as an ``nn.Linear``
parameter (``alpha * B``, transposed when ``transB=0``), or as a buffer of its
``initializers`` container read through a ``get_attr`` node (MatMul, non-Linear Gemm). A
``TorchTensorRef`` records which, so the same initializer can be read from and written to any
copy of the converted module in ONNX layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import fx, nn

import converters.ops  # noqa: F401  (registers the converters onnx2torch lacks)
from converters.ops import _REGISTRY, _describe, _register
from otbr_onnx.errors import UnsupportedModelError, one_line
from otbr_onnx.layers import WeightLayer


@dataclass(frozen=True)
class TorchTensorRef:
    """One ONNX initializer inside a converted module: ``onnx = (torch / scale)``, maybe transposed."""

    owner: str  # qualified submodule name
    attr: str
    transpose: bool = False
    scale: float = 1.0

    def tensor(self, module: nn.Module) -> torch.Tensor:
        return getattr(module.get_submodule(self.owner), self.attr)

    def read(self, module: nn.Module) -> np.ndarray:
        """The tensor in ONNX layout, as float32 numpy (a copy)."""
        value = self.tensor(module).detach().cpu().numpy().astype(np.float32, copy=True)
        if self.scale != 1.0:
            value = value / np.float32(self.scale)
        return np.ascontiguousarray(value.T) if self.transpose else value

    def write(self, module: nn.Module, value: np.ndarray) -> None:
        """Set the tensor from an ONNX-layout array."""
        array = value.T if self.transpose else value
        if self.scale != 1.0:
            array = array * np.float32(self.scale)
        target = self.tensor(module)
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True)))


# --------------------------------------------------------------------------------------------
# LayerNormalization: normalized_shape from the scale, not from shape inference
# --------------------------------------------------------------------------------------------


def _original_layer_norm():
    """onnx2torch's own LayerNormalization-17 converter (also after a re-import of this module)."""
    existing = _REGISTRY[_describe("LayerNormalization", 17)]
    return getattr(existing, "_otbr_replaces", existing)


def _normalized_rank(axis: int, node, graph) -> int | None:
    """How many trailing axes a LayerNormalization normalises, or None if unknown."""
    if axis < 0:
        return -axis
    info = graph.value_info.get(node.input_values[0])
    dims = info.type.tensor_type.shape.dim if info is not None and info.type.tensor_type.HasField("shape") else None
    return len(dims) - axis if dims else None


def _convert_layer_norm(node, graph):
    """``nn.LayerNorm`` whose ``normalized_shape`` is the scale's shape.

    onnx2torch reads ``normalized_shape`` from the input's inferred shape. Where inference left
    it unknown (the legacy exporter computes an MLP-Mixer's token reshape through ``Shape``
    chains), it builds ``LayerNorm([0])``, which fails on the first call. The scale initializer
    holds the normalised shape itself, whatever the input shape inference found.
    """
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

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
    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    )


_convert_layer_norm._otbr_replaces = _original_layer_norm()
_register("LayerNormalization", (17,), _convert_layer_norm, replace=True)


def check_convertible(model: onnx.ModelProto) -> None:
    """Refuse, naming the node, any op that onnx2torch (plus our converters) cannot convert."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {entry.domain or "": entry.version for entry in model.opset_import}
    for node in model.graph.node:
        domain = node.domain or ""
        version = opsets.get(domain, opsets.get("ai.onnx", 0))
        try:
            get_converter(operation_type=node.op_type, version=version, domain=domain)
        except NotImplementedError as error:
            raise UnsupportedModelError(
                f"op {node.op_type} (opset {version}) at node '{node.name}' has no PyTorch converter"
            ) from error


def convert(model: onnx.ModelProto) -> fx.GraphModule:
    """Convert with onnx2torch; a converter failure becomes a refusal naming the problem."""
    from onnx2torch import convert as onnx2torch_convert

    check_convertible(model)
    try:
        module = onnx2torch_convert(_neutral_names(model))
    except (NotImplementedError, KeyError, ValueError, RuntimeError, TypeError) as error:
        raise UnsupportedModelError(
            f"onnx2torch cannot convert the model: {one_line(error, type(error).__name__)}"
        ) from error
    return module.eval()


def module_names(model: onnx.ModelProto) -> list[str]:
    """The submodule name ``convert`` gives each node of ``model.graph.node``, in order."""
    from onnx2torch.onnx_graph import OnnxGraph

    return list(OnnxGraph(_neutral_names(model).graph).nodes.keys())


def _neutral_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes are named n0, n1, ...: onnx2torch pastes node names into the Python
    source torch.fx generates, so a hostile name could otherwise become code (load.py refuses
    such names too; this keeps conversion safe on its own)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        node.name = f"n{index}"
    return copy


def weight_refs(
    module: fx.GraphModule, model: onnx.ModelProto, layers: list[WeightLayer]
) -> dict[str, TorchTensorRef]:
    """Map each weight layer's weight and bias initializer names to tensors in ``module``.

    Every reference is verified against the initializer's values: a mapping that does not
    reproduce the ONNX tensor is a refusal, never a guess.
    """
    names = module_names(model)
    inits = {t.name: t for t in model.graph.initializer}
    refs: dict[str, TorchTensorRef] = {}
    for layer in layers:
        node = model.graph.node[layer.node_index]
        found = _refs_for(module, names[layer.node_index], node, layer)
        for init_name, ref in found.items():
            expected = onnx.numpy_helper.to_array(inits[init_name])
            actual = ref.read(module)
            if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-5, atol=1e-6):
                raise UnsupportedModelError(
                    f"cannot locate weight '{init_name}' of node '{layer.label}' in the converted model"
                )
            refs[init_name] = ref
    return refs


def _refs_for(module: fx.GraphModule, name: str, node: onnx.NodeProto, layer: WeightLayer) -> dict[str, TorchTensorRef]:
    sub = module.get_submodule(name)
    owner = name
    if isinstance(sub, nn.Sequential):  # onnx2torch puts asymmetric padding in front of the conv
        owner, sub = f"{name}.{len(sub) - 1}", sub[-1]
    refs: dict[str, TorchTensorRef] = {}
    if isinstance(sub, nn.modules.conv._ConvNd):  # noqa: SLF001 - the common base of Conv1d/2d/3d
        refs[layer.weight] = TorchTensorRef(owner, "weight")
        if layer.bias:
            refs[layer.bias] = TorchTensorRef(owner, "bias")
        return refs
    if isinstance(sub, nn.Linear):
        alpha, beta = _gemm_scales(node)
        refs[layer.weight] = TorchTensorRef(owner, "weight", transpose=layer.layout != "out_in", scale=alpha)
        if layer.bias:
            refs[layer.bias] = TorchTensorRef(owner, "bias", scale=beta)
        return refs
    # MatMul / generic Gemm: the weight is a buffer fed to the module through a get_attr node
    call = next(n for n in module.graph.nodes if n.op == "call_module" and n.target == name)
    for position, init_name in enumerate(node.input):
        if init_name in (layer.weight, layer.bias) and init_name:
            arg = call.args[position] if position < len(call.args) else call.kwargs.get("input_c")
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                raise UnsupportedModelError(f"cannot locate weight '{init_name}' of node '{layer.label}'")
            owner_name, _, attr = arg.target.rpartition(".")
            refs[init_name] = TorchTensorRef(owner_name, attr)
    return refs


def _gemm_scales(node: onnx.NodeProto) -> tuple[float, float]:
    alpha = beta = 1.0
    for attribute in node.attribute:
        if attribute.name == "alpha":
            alpha = attribute.f
        if attribute.name == "beta":
            beta = attribute.f
    if alpha == 0.0:
        raise UnsupportedModelError(f"Gemm '{node.name}' has alpha=0; its weight is unused")
    return alpha, beta
