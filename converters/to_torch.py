"""ONNX -> PyTorch with onnx2torch, and where each weight initializer lives in the result.

onnx2torch names each submodule after its ONNX node, but it stores a weight in one of three
ways: as the ``weight``/``bias`` parameter of an ``nn.Conv*`` (same layout), as an ``nn.Linear``
parameter (``alpha * B``, transposed when ``transB=0``), or as a buffer of its
``initializers`` container read through a ``get_attr`` node (MatMul, non-Linear Gemm). A
``TorchTensorRef`` records which, so the same initializer can be read from and written to any
copy of the converted module in ONNX layout.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
import torch
from torch import fx, nn

import converters.ops  # noqa: F401  (registers the converters onnx2torch lacks)
from converters.errors import ConversionError, one_line


class WeightSpec(Protocol):
    """What ``weight_refs`` reads of a weight layer; ``otbr_onnx.layers.WeightLayer`` is one."""

    @property
    def node_index(self) -> int: ...  # position in graph.node

    @property
    def weight(self) -> str: ...  # initializer name

    @property
    def bias(self) -> str | None: ...

    @property
    def layout(self) -> str: ...  # "out_in": a Gemm weight stored [out, in]; else [in, out] or a conv

    @property
    def label(self) -> str: ...  # how messages name the node


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


def run_torch(module: nn.Module, x: np.ndarray, output_index: int) -> np.ndarray:
    """The converted module's output ``output_index`` on ``x``, as numpy."""
    # torch.fx prints its own traceback to stderr when forward fails; the caller reports instead
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
        out = module(torch.from_numpy(x))
    if isinstance(out, (tuple, list)):
        out = out[output_index]
    return out.detach().cpu().numpy()


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
            raise ConversionError(
                f"op {node.op_type} (opset {version}) at node '{node.name}' has no PyTorch converter"
            ) from error


def convert(model: onnx.ModelProto) -> fx.GraphModule:
    """Convert with onnx2torch; a converter failure becomes a refusal naming the problem."""
    from onnx2torch import convert as onnx2torch_convert

    check_convertible(model)
    try:
        module = onnx2torch_convert(_neutral_names(model))
    except (NotImplementedError, KeyError, ValueError, RuntimeError, TypeError) as error:
        raise ConversionError(
            f"onnx2torch cannot convert the model: {one_line(error, type(error).__name__)}"
        ) from error
    return module.eval()


def module_names(model: onnx.ModelProto) -> list[str]:
    """The submodule name ``convert`` gives each node of ``model.graph.node``, in order."""
    from onnx2torch.onnx_graph import OnnxGraph

    return list(OnnxGraph(_neutral_names(model).graph).nodes.keys())


def _neutral_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes are named n0, n1, ...: onnx2torch pastes node names into the Python
    source torch.fx generates, so a hostile name could otherwise become code (load/checks.py refuses
    such names too; this keeps conversion safe on its own)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        node.name = f"n{index}"
    return copy


def weight_refs(
    module: fx.GraphModule, model: onnx.ModelProto, layers: list[WeightSpec]
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
                raise ConversionError(
                    f"cannot locate weight '{init_name}' of node '{layer.label}' in the converted model"
                )
            refs[init_name] = ref
    return refs


# A BatchNormalization's inputs 1-4 and the attributes of the torch layer onnx2torch makes of it
_BATCHNORM_ATTRS = ("weight", "bias", "running_mean", "running_var")


def batchnorm_refs(module: fx.GraphModule, model: onnx.ModelProto, slots: set[str] | dict) -> dict[str, TorchTensorRef]:
    """Map the scale, bias, mean and variance initializers of every BatchNormalization node whose
    four inputs are all in ``slots`` to the torch BatchNorm layer's tensors. A node converted to
    anything else, or a tensor that does not reproduce the initializer, is left out (never a guess)."""
    names = module_names(model)
    inits = {t.name: t for t in model.graph.initializer}
    refs: dict[str, TorchTensorRef] = {}
    for index, node in enumerate(model.graph.node):
        inputs = list(node.input[1:5])
        if node.op_type != "BatchNormalization" or len(inputs) < 4 or not all(i in slots and i in inits for i in inputs):
            continue
        layer = module.get_submodule(names[index])
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or not layer.track_running_stats:  # noqa: SLF001
            continue
        found = {name: TorchTensorRef(names[index], attr) for name, attr in zip(inputs, _BATCHNORM_ATTRS)}
        if all(_reproduces(ref.read(module), onnx.numpy_helper.to_array(inits[name])) for name, ref in found.items()):
            refs.update(found)
    return refs


def _reproduces(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and bool(np.allclose(actual, expected, rtol=1e-5, atol=1e-6))


def _refs_for(module: fx.GraphModule, name: str, node: onnx.NodeProto, layer: WeightSpec) -> dict[str, TorchTensorRef]:
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
                raise ConversionError(f"cannot locate weight '{init_name}' of node '{layer.label}'")
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
        raise ConversionError(f"Gemm '{node.name}' has alpha=0; its weight is unused")
    return alpha, beta
