"""Each extra onnx2torch converter in converters.ops, checked against onnxruntime on random inputs.

Graphs are built by hand with onnx.helper (no data, no network); the last tests export small torch
models with the dynamo exporter, which is what emits these ops in practice. The dynamo exporter
(torch + onnxscript, both declared test dependencies) must work: an export failure fails the test.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import converters.ops as extra_ops
import onnx2torch
from onnx2torch.node_converters.registry import get_converter
from tests.builders import export, ort_run

# torch's dynamo exporter as it is, its own names and a fixed batch. Never skipped: onnxscript is
# a test dependency, and an exporter failure is a failure of the test (as in test_coverage.py).
DYNAMO = dict(exporter="dynamo", dynamic_batch=False, names=False)

RNG = np.random.default_rng(0)
TIGHT = dict(rtol=1e-6, atol=1e-6)
# Normalisations and transcendental ops accumulate a few ulps differently in torch and ORT.
LOOSE = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_model(
    nodes: Sequence[onnx.NodeProto],
    feeds: Dict[str, np.ndarray],
    outputs: Sequence[str],
    opset: int,
    initializers: Optional[Dict[str, np.ndarray]] = None,
) -> onnx.ModelProto:
    """A single-graph model whose inputs take their dtype and shape from ``feeds``."""
    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in feeds.items()
    ]
    graph = helper.make_graph(
        list(nodes),
        "g",
        inputs,
        [helper.make_empty_tensor_value_info(name) for name in outputs],  # typed by inference below
        initializer=[numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # what this onnxruntime accepts for every opset used here
    check_nodes(model)  # a malformed test graph should fail here, not look like a converter bug
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    type_untyped_outputs_as_float(model)
    return model


def check_nodes(model: onnx.ModelProto) -> None:
    """Each node against its schema (attributes, input counts) at the model's opset."""
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version
    context.opset_imports = {entry.domain: entry.version for entry in model.opset_import}
    for node in model.graph.node:
        try:
            onnx.checker.check_node(node, context)
        except onnx.checker.ValidationError as error:
            # Deprecated versions (GroupNormalization-18) still occur in exported models and run in ORT.
            if "deprecated" not in str(error):
                raise


def type_untyped_outputs_as_float(model: onnx.ModelProto) -> None:
    """Inference gives up on some outputs (run-time axes, function ops); every such test is float."""
    for output in model.graph.output:
        if not output.type.HasField("tensor_type"):
            output.type.tensor_type.elem_type = TensorProto.FLOAT


def run_converted(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    module = onnx2torch.convert(model).eval()
    with torch.no_grad():
        result = module(*(torch.from_numpy(value) for value in feeds.values()))
    results = result if isinstance(result, (tuple, list)) else [result]
    return [tensor.numpy() for tensor in results]


def assert_matches_onnxruntime(
    model: onnx.ModelProto, feeds: Dict[str, np.ndarray], tolerance: Optional[dict] = None
) -> None:
    expected = ort_run(model, feeds)
    actual = run_converted(model, feeds)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, **(tolerance or TIGHT))


def check_node(
    node: onnx.NodeProto,
    feeds: Dict[str, np.ndarray],
    opset: int,
    initializers: Optional[Dict[str, np.ndarray]] = None,
    tolerance: Optional[dict] = None,
) -> None:
    model = make_model([node], feeds, list(node.output), opset, initializers)
    assert_matches_onnxruntime(model, feeds, tolerance)


def positive(*shape: int) -> np.ndarray:
    """Values in [0.5, 1.5): keeps ReduceLogSum defined and ReduceProd away from under/overflow."""
    return (RNG.random(shape) + 0.5).astype(np.float32)


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------


def test_reimport_is_harmless() -> None:
    importlib.reload(extra_ops)
    # A second copy under another module name runs every registration again.
    spec = importlib.util.spec_from_file_location("converters_ops_copy", extra_ops.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    # ... and the registered converters still convert correctly
    check_node(reduce_node("ReduceMean", True, 1, 0), {"x": positive(2, 3, 4, 5)}, 18, {"axes": ints(2, 3)}, LOOSE)


@pytest.mark.parametrize(
    "op_type, opset",
    [("ReduceMean", 18), ("ReduceMax", 20), ("CastLike", 15), ("Gelu", 20), ("Shape", 20), ("Conv", 23)],
)
def test_registered_for_model_opset(op_type: str, opset: int) -> None:
    converter = get_converter(op_type, opset)  # raises NotImplementedError when missing
    assert callable(converter), (op_type, opset, converter)


@pytest.mark.parametrize("op_type", sorted(extra_ops.TYPE_ONLY_BUMPS))
def test_type_only_bumps_are_aliased(op_type: str) -> None:
    # The import-time signature guard must not have silently dropped a listed version: each
    # target version converts with the very converter of the source version.
    source, targets = extra_ops.TYPE_ONLY_BUMPS[op_type]
    converter = get_converter(op_type, source)
    for version in targets:
        assert get_converter(op_type, version) is converter, (op_type, version)


# ------------------------------------------------------------------------------------------------
# Reduce*
# ------------------------------------------------------------------------------------------------

REDUCE_OPS = [
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
]

# (axes as a constant input or None for "no axes input", keepdims, noop_with_empty_axes)
REDUCE_CASES = [
    (ints(2, 3), 1, 0),  # global pooling, as x.mean(dim=(2, 3), keepdim=True)
    (ints(-1, 0), 0, 0),  # negative, unsorted axes without keepdims
    (ints(1), 0, 0),
    (None, 0, 0),  # no axes: reduce everything
    (ints(), 0, 0),  # empty axes without noop: also everything (crashed onnx2torch's ReduceSum)
    (None, 1, 0),
    (ints(), 0, 1),  # empty axes with noop: identity
    (None, 1, 1),
]


def reduce_node(op_type: str, with_axes: bool, keepdims: int, noop: int) -> onnx.NodeProto:
    inputs = ["x", "axes"] if with_axes else ["x"]
    return helper.make_node(op_type, inputs, ["y"], keepdims=keepdims, noop_with_empty_axes=noop)


@pytest.mark.parametrize("op_type", REDUCE_OPS)
@pytest.mark.parametrize("axes, keepdims, noop", REDUCE_CASES)
def test_reduce_axes_input_constant(op_type: str, axes: Optional[np.ndarray], keepdims: int, noop: int) -> None:
    opset = 13 if op_type == "ReduceSum" else 18  # ReduceSum took axes as an input first, at 13
    node = reduce_node(op_type, axes is not None, keepdims, noop)
    initializers = None if axes is None else {"axes": axes}
    check_node(node, {"x": positive(2, 3, 4, 5)}, opset, initializers, LOOSE)


@pytest.mark.parametrize("op_type", REDUCE_OPS)
def test_reduce_axes_input_dynamic(op_type: str) -> None:
    opset = 13 if op_type == "ReduceSum" else 18
    node = reduce_node(op_type, with_axes=True, keepdims=0, noop=0)
    check_node(node, {"x": positive(2, 3, 4, 5), "axes": ints(-2, 1)}, opset, tolerance=LOOSE)


@pytest.mark.parametrize("op_type", ["ReduceMax", "ReduceMin"])
def test_reduce_max_min_opset20(op_type: str) -> None:
    node = reduce_node(op_type, with_axes=True, keepdims=1, noop=0)
    check_node(node, {"x": normal(2, 3, 4)}, 20, {"axes": ints(0, 2)})


@pytest.mark.parametrize("op_type", [op for op in REDUCE_OPS if op != "ReduceSum"])
@pytest.mark.parametrize("axes", [[-1, 0], [1], None])
def test_reduce_axes_attribute_opset13(op_type: str, axes: Optional[List[int]]) -> None:
    # onnx2torch's own version returned the wrong shape for negative axes without keepdims.
    attributes = {"keepdims": 0} if axes is None else {"keepdims": 0, "axes": axes}
    node = helper.make_node(op_type, ["x"], ["y"], **attributes)
    check_node(node, {"x": positive(2, 3, 4)}, 13, tolerance=LOOSE)


# ------------------------------------------------------------------------------------------------
# CastLike / Cast
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [15, 19, 21])
@pytest.mark.parametrize(
    "source, target",
    [(normal(3, 4) * 10, np.zeros(1, np.int64)), (np.arange(12, dtype=np.int32).reshape(3, 4), np.zeros(1, np.float32))],
)
def test_cast_like(opset: int, source: np.ndarray, target: np.ndarray) -> None:
    node = helper.make_node("CastLike", ["x", "like"], ["y"])
    check_node(node, {"x": source}, opset, {"like": target})


def test_cast_like_with_dynamic_target() -> None:
    node = helper.make_node("CastLike", ["x", "like"], ["y"])
    check_node(node, {"x": normal(2, 5), "like": np.ones(3, dtype=np.float64)}, 15)


@pytest.mark.parametrize("opset", [19, 21])
def test_cast_new_versions(opset: int) -> None:
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32)
    check_node(node, {"x": normal(4, 3) * 10}, opset)


# ------------------------------------------------------------------------------------------------
# Reshape
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [14, 19, 21])
@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_constant_shape(opset: int, allowzero: int) -> None:
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)
    check_node(node, {"x": normal(2, 3, 4)}, opset, {"shape": ints(2, -1, 2)})


def test_reshape_zero_copies_dim_without_allowzero() -> None:
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=0)
    check_node(node, {"x": normal(2, 3, 4)}, 14, {"shape": ints(0, 12)})


def test_reshape_allowzero_keeps_zero_dims() -> None:
    # With allowzero=1 a 0 is a literal empty dim (needs an empty input), not "copy the input dim".
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    check_node(node, {"x": np.zeros((0, 3), np.float32)}, 14, {"shape": ints(3, 0)})


def test_reshape_allowzero_dynamic_shape() -> None:
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    check_node(node, {"x": normal(2, 3, 4), "shape": ints(4, -1)}, 19)


# ------------------------------------------------------------------------------------------------
# Gelu, Split, Pad, Clip, GroupNormalization, pooling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate: str) -> None:
    node = helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    check_node(node, {"x": normal(3, 8) * 3}, 20, tolerance=LOOSE)


def test_split_num_outputs_uneven() -> None:
    node = helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)
    check_node(node, {"x": normal(2, 7)}, 18)


def test_split_sizes_input() -> None:
    node = helper.make_node("Split", ["x", "split"], ["a", "b"], axis=-1)
    check_node(node, {"x": normal(2, 3, 5)}, 18, {"split": ints(1, 4)})


def test_split_single_output() -> None:
    node = helper.make_node("Split", ["x"], ["a"], axis=0, num_outputs=1)
    check_node(node, {"x": normal(4, 2)}, 18)


PAD_CASES = [
    # (mode, pads, constant value or None, axes or None, opset)
    ("constant", ints(0, 0, 1, 2, 0, 0, 2, 1), None, None, 18),
    ("constant", ints(1, -1, 2, 1), np.array(3.5, np.float32), ints(1, 3), 18),  # negative pad crops
    ("reflect", ints(1, 2, 2, 1), None, ints(-1, 2), 18),
    ("edge", ints(0, 0, 1, 2, 0, 0, 2, 1), None, None, 18),
    ("wrap", ints(0, 0, 1, 2, 0, 0, 2, 1), None, None, 19),
    ("constant", ints(0, 0, 1, 1, 0, 0, 1, 1), None, None, 21),
]


@pytest.mark.parametrize("mode, pads, value, axes, opset", PAD_CASES)
def test_pad(mode: str, pads: np.ndarray, value: Optional[np.ndarray], axes: Optional[np.ndarray], opset: int) -> None:
    initializers = {"pads": pads}
    inputs = ["x", "pads", "value" if value is not None else ""]
    if value is not None:
        initializers["value"] = value
    if axes is not None:
        inputs.append("axes")
        initializers["axes"] = axes
    node = helper.make_node("Pad", inputs, ["y"], mode=mode)
    check_node(node, {"x": normal(2, 3, 4, 4)}, opset, initializers)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(
    "inputs, bounds",
    [
        (["x", "lo", ""], {"lo": np.array(-0.5, np.float32)}),  # what torch writes for F.normalize
        (["x", "", "hi"], {"hi": np.array(0.25, np.float32)}),
        (["x", "lo", "hi"], {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}),
        (["x"], {}),
    ],
)
def test_clip_constant_or_omitted_bounds(opset: int, inputs: List[str], bounds: Dict[str, np.ndarray]) -> None:
    node = helper.make_node("Clip", inputs, ["y"])
    check_node(node, {"x": normal(3, 4) * 4}, opset, bounds)


def test_clip_bounds_computed_at_run_time() -> None:
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    feeds = {"x": normal(3, 4), "lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}
    check_node(node, feeds, 13)


@pytest.mark.parametrize("opset, affine_size", [(18, 3), (21, 6)])
def test_group_normalization(opset: int, affine_size: int) -> None:
    # Opset 18 has one scale/bias per group; 21 has one per channel.
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=3, epsilon=1e-5)
    initializers = {"scale": normal(affine_size), "bias": normal(affine_size)}
    check_node(node, {"x": normal(2, 6, 4, 4)}, opset, initializers, LOOSE)


@pytest.mark.parametrize("opset", [13, 22])
def test_global_max_pool(opset: int) -> None:
    check_node(helper.make_node("GlobalMaxPool", ["x"], ["y"]), {"x": normal(2, 3, 5, 4)}, opset)


@pytest.mark.parametrize("opset", [19, 22])
def test_average_pool_new_versions(opset: int) -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    check_node(node, {"x": normal(2, 3, 8, 8)}, opset, tolerance=LOOSE)


def test_average_pool_dilations_refused() -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])
    model = make_model([node], {"x": normal(1, 1, 6, 6)}, ["y"], 19)
    with pytest.raises(NotImplementedError, match="dilations"):
        onnx2torch.convert(model)


def test_type_only_bumps_end_to_end() -> None:
    # Conv-22, Shape-21, Reshape-21, Flatten-21, Constant-21 all in one opset-22 graph.
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"], start=0, end=1),
        helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(ints(-1))),
        helper.make_node("Concat", ["s", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["c", "target"], ["r"]),
        helper.make_node("Flatten", ["r"], ["y"], axis=1),
    ]
    feeds = {"x": normal(2, 3, 5, 5)}
    model = make_model(nodes, feeds, ["y"], 22, {"w": normal(4, 3, 3, 3), "b": normal(4)})
    assert_matches_onnxruntime(model, feeds, LOOSE)


# ------------------------------------------------------------------------------------------------
# torch's dynamo exporter end to end
# ------------------------------------------------------------------------------------------------


class MeanPoolCnn(nn.Module):
    """A CNN whose global pooling is ``x.mean(dim=(2, 3))``: ReduceMean-18 with an axes input."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyVit(nn.Module):
    """Patch conv, one pre-norm block with hand-written attention, GELU MLP, Linear head."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x).mean(dim=1))


def op_types(model: onnx.ModelProto) -> set:
    return {node.op_type for node in model.graph.node}


def test_dynamo_mean_pool_cnn_opset18() -> None:
    torch.manual_seed(0)
    model = MeanPoolCnn().eval()
    onnx_model = export(model, (2, 3, 16, 16), 18, **DYNAMO, example=torch.randn(2, 3, 16, 16))
    assert "ReduceMean" in op_types(onnx_model)  # the op this test is about
    feeds = {onnx_model.graph.input[0].name: normal(2, 3, 16, 16)}
    assert_matches_onnxruntime(onnx_model, feeds, LOOSE)


@pytest.mark.parametrize("opset", [18, None])  # None: the exporter's default (20 in torch 2.14)
def test_dynamo_tiny_vit(opset: Optional[int]) -> None:
    torch.manual_seed(0)
    model = TinyVit().eval()
    onnx_model = export(model, (2, 3, 32, 32), opset, **DYNAMO, example=torch.randn(2, 3, 32, 32))
    feeds = {onnx_model.graph.input[0].name: normal(2, 3, 32, 32)}
    assert_matches_onnxruntime(onnx_model, feeds, LOOSE)
