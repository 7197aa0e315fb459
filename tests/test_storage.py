"""Weight storages (``converters/storage.py``): weights behind Identity, in Constant nodes, in
float16 / bfloat16, and int8 QDQ. Each model cleans to the same graph (node kinds, names, inputs
and outputs, initializer names, dtypes and dims), with its weights back in the storage they came
from, and with parity against onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from builders import build, export
from conftest import FAST, FAST_ARGS
from converters import storage
from models.architectures import build as build_architecture
from otbr_onnx import clean
from otbr_onnx.cli import main
from otbr_onnx.errors import UnsupportedModelError
from otbr_onnx.verify import verify

SHAPE = (1, 1, 8, 8)
OPTIONS = FAST.with_(removal={"prune_ratio": 0.25})


# --- helpers --------------------------------------------------------------------------------------

def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    return storage.constant_tensor(node) if node.op_type == "Constant" else None


def assert_same_graph(before: onnx.ModelProto, after: onnx.ModelProto, shape: tuple[int, ...] = SHAPE) -> None:
    """Node kinds, names, inputs, outputs and attributes (Constant values aside), initializer
    names, dtypes and dims, graph inputs and outputs: all unchanged."""
    nodes = lambda m: [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    assert nodes(after) == nodes(before)
    for a, b in zip(before.graph.node, after.graph.node):
        ta, tb = _constant_tensor(a), _constant_tensor(b)
        if ta is not None:
            assert (ta.data_type, list(ta.dims)) == (tb.data_type, list(tb.dims))
        else:
            assert a.attribute == b.attribute
    inits = lambda m: [(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer]  # noqa: E731
    assert inits(after) == inits(before)
    assert before.graph.input == after.graph.input and before.graph.output == after.graph.output
    assert verify(before, after, "input", shape, samples=8).same_graph


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every stored tensor by name: initializers and Constant outputs."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found.update({n.output[0]: numpy_helper.to_array(_constant_tensor(n)) for n in model.graph.node
                  if _constant_tensor(n) is not None})
    return found


def changed(before: onnx.ModelProto, after: onnx.ModelProto) -> set[str]:
    old, new = values(before), values(after)
    return {name for name in old if not np.array_equal(old[name], new[name])}


SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "report.schema.json").read_text())


def parity_ok(result) -> None:
    """Parity held, and the report (with its storage section) follows the schema."""
    assert result.parity.ok and result.report["parity"]["output"]["ok"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(json.dumps(result.report)), SCHEMA)


# --- Identity (torch's legacy exporter) -----------------------------------------------------------

def fresh_preact() -> onnx.ModelProto:
    """A freshly initialised PreAct-ResNet: zero BatchNorm biases, deduplicated by the legacy
    exporter into conv biases fed through Identity."""
    torch.manual_seed(0)
    model = build_architecture("preact_resnet", in_channels=1, num_classes=4, widths=(4, 8), blocks=(1, 1))
    return export(model, SHAPE)


def test_identity_fed_weights_clean_with_shared_biases_left_as_they_are() -> None:
    original = fresh_preact()
    identities = [n for n in original.graph.node if n.op_type == "Identity"]
    biases = {c.input[2] for c in original.graph.node if c.op_type == "Conv" and len(c.input) > 2}
    conv_bias = [n.output[0] for n in identities if n.output[0] in biases]
    assert conv_bias, "the legacy exporter no longer feeds conv biases through Identity"
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert_same_graph(original, result.model)
    # the Identity sources are BatchNorm parameters too: shared, reported, never written
    sources = {n.output[0]: n.input[0] for n in identities}
    assert not changed(original, result.model) & {sources[s] for s in conv_bias}
    report = result.report
    assert set(report["storage"]["shared"]) >= set(conv_bias)
    kept = [layer for layer in report["layers"] if "bias_kept" in layer["storage"]]
    assert len(kept) == len(conv_bias) and all(layer["storage"]["weight"] == "initializer" for layer in kept)
    assert changed(original, result.model)  # the weights did move


@pytest.mark.slow
def test_fresh_preact_resnet18_from_the_legacy_exporter_cleans() -> None:
    """Issue 15's case: a freshly initialised PreAct-ResNet18 at opset 17 (36 Identity nodes,
    onnx2torch used to fail on 'onnx::Conv_175') cleans to the same graph with parity."""
    torch.manual_seed(0)
    net = build_architecture("preact_resnet", in_channels=3, num_classes=10, widths=(64, 128, 256, 512),
                             blocks=(2, 2, 2, 2))
    original = export(net, (1, 3, 32, 32))
    assert sum(n.op_type == "Identity" for n in original.graph.node) == 36
    result = clean(original, FAST.with_(removal={"prune_ratio": 0.02}))
    parity_ok(result)
    assert_same_graph(original, result.model, shape=(1, 3, 32, 32))
    assert changed(original, result.model)
    assert sum("bias_kept" in layer["storage"] for layer in result.report["layers"]) == 8


def test_a_weight_read_by_two_convs_through_identity_is_skipped() -> None:
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5, np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_a"], name="id_a"),
             helper.make_node("Identity", ["w"], ["w_b"], name="id_b"),
             helper.make_node("Conv", ["input", "w_a"], ["h"], name="conv_a"),
             helper.make_node("Conv", ["h", "w_b"], ["y"], name="conv_b")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], [w]))
    store = storage.analyse(model)
    assert store.shared == {"w_a": 2, "w_b": 2} and store.counts() == {"initializer>Identity": 2}
    from otbr_onnx.layers import find_weight_layers

    layers, skipped = find_weight_layers(store.working, store.shared)
    assert not layers and [s.node_name for s in skipped] == ["conv_a", "conv_b"]
    assert "shared" in skipped[0].reason


# --- Constant nodes (Paddle) ----------------------------------------------------------------------

def _const(name: str, array: np.ndarray, dtype=np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(array.astype(dtype), name))


def constant_model(seed: int = 0, width: int = 6, classes: int = 4) -> onnx.ModelProto:
    """Conv + BatchNorm + Relu + Conv + Relu + GAP + Gemm, every weight in a Constant node."""
    r = np.random.default_rng(seed)
    nodes = [_const("w1", r.normal(0, .5, (width, 1, 3, 3))), _const("b1", r.normal(0, .1, width)),
             _const("g", 1 + .1 * r.normal(size=width)), _const("beta", .1 * r.normal(size=width)),
             _const("mean", .1 * r.normal(size=width)), _const("var", 1 + .1 * r.random(width)),
             _const("w2", r.normal(0, .5, (width, width, 3, 3))), _const("b2", r.normal(0, .1, width)),
             _const("fw", r.normal(0, .5, (classes, width))), _const("fb", r.normal(0, .1, classes)),
             helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h1", "g", "beta", "mean", "var"], ["h2"], name="bn1"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu1"),
             helper.make_node("Conv", ["h3", "w2", "b2"], ["h4"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h4"], ["h5"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["h5"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "constants", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_in_constant_nodes_are_cleaned_in_place() -> None:
    original = constant_model()
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert_same_graph(original, result.model)
    assert not result.model.graph.initializer  # nothing moved into initializers
    moved = changed(original, result.model)
    assert moved and moved <= {"w1", "b1", "w2", "b2", "fw", "fb"}  # BatchNorm constants untouched
    assert result.report["storage"]["counts"] == {"constant": 6}
    check = verify(original, result.model, "input", SHAPE, samples=8)
    assert set(check.moved) == moved


def test_verify_still_flags_a_changed_non_weight_constant() -> None:
    original = constant_model()
    tampered = onnx.ModelProto()
    tampered.CopyFrom(original)
    node = next(n for n in tampered.graph.node if n.output[0] == "mean")
    storage.constant_tensor(node).CopyFrom(numpy_helper.from_array(np.ones(6, np.float32), "mean"))
    result = verify(original, tampered, "input", SHAPE, samples=4)
    assert not result.same_graph and "node" in result.first_difference


# --- float16 / bfloat16 ---------------------------------------------------------------------------

def test_float16_model_is_written_back_in_float16() -> None:
    float16 = pytest.importorskip("onnxconverter_common.float16")
    _, model = build("chain", shape=SHAPE)
    original = float16.convert_float_to_float16(model, keep_io_types=True)
    assert {t.data_type for t in original.graph.initializer} == {TensorProto.FLOAT16}
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert_same_graph(original, result.model)
    assert changed(original, result.model)
    assert result.report["storage"]["precision"] == "float16"
    assert result.report["parity"]["float_copy"]["ok"]


def test_float16_end_to_end_model_keeps_its_float16_input_and_output(tmp_path: Path) -> None:
    """``convert_float_to_float16``'s default: the image input and the logits are float16 too
    (before: refused, "only float32 image inputs"). onnxruntime gets the images rounded to
    float16, the working copy reads them in float32; the written model keeps its float16 I/O."""
    float16 = pytest.importorskip("onnxconverter_common.float16")
    _, model = build("chain", shape=SHAPE)
    original = float16.convert_float_to_float16(model)
    assert original.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert_same_graph(original, result.model)
    assert changed(original, result.model)
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert result.report["storage"]["precision"] == "float16"
    source = tmp_path / "fp16.onnx"
    onnx.save(original, source)
    x = np.random.default_rng(0).random((8, *SHAPE[1:]), dtype=np.float32)
    import onnxruntime

    own = onnxruntime.InferenceSession(original.SerializeToString()).run(None, {"input": x.astype(np.float16)})[0]
    data = tmp_path / "d.npz"  # labelled with the model's own answers: eval must find ACC 100
    np.savez(data, x=x, y=own.astype(np.float32).argmax(1))
    shown = CliRunner().invoke(main, ["eval", str(source), "--data", str(data), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["metrics"]["acc"] == 100.0


def bfloat16_chain() -> onnx.ModelProto:
    """The Chain with bfloat16 weights cast to float32 in front of each layer (how bfloat16
    weights run where a provider has no bfloat16 kernels)."""
    _, model = build("chain", shape=SHAPE)
    weights = {t.name for t in model.graph.initializer}
    for tensor in list(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        stored = helper.make_tensor(tensor.name + "_bf16", TensorProto.BFLOAT16, array.shape,
                                    vals=array.flatten().tolist())
        model.graph.initializer.remove(tensor)
        model.graph.initializer.append(stored)
    casts = [helper.make_node("Cast", [name + "_bf16"], [name], name=f"cast_{name}", to=TensorProto.FLOAT)
             for name in sorted(weights)]
    nodes = [*casts, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def test_bfloat16_weights_behind_cast_are_written_back_in_bfloat16() -> None:
    original = bfloat16_chain()
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert_same_graph(original, result.model)
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.BFLOAT16}
    assert changed(original, result.model)
    assert result.report["storage"]["counts"] == {"initializer(BFLOAT16)>Cast": 6}


# --- int8 QDQ -------------------------------------------------------------------------------------

def quantized(model: onnx.ModelProto, folder: Path, per_channel: bool, qoperator: bool = False) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Noise(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.random(SHAPE, dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    source, target = folder / "float.onnx", folder / "int8.onnx"
    onnx.save(model, source)
    quantize_static(str(source), str(target), Noise(), per_channel=per_channel,
                    quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(target)


def _scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {name: value for name, value in values(model).items() if name.endswith(("_scale", "_zero_point"))}


@pytest.mark.parametrize("kind", ["chain", "preact"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_qdq_int8_model_is_requantized_with_its_own_scales(kind: str, per_channel: bool, tmp_path: Path) -> None:
    _, model = build(kind, shape=SHAPE)
    original = quantized(model, tmp_path, per_channel)
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert result.report["parity"]["float_copy"]["ok"]
    assert_same_graph(original, result.model)
    moved = changed(original, result.model)
    report = result.report["storage"]
    # int8 weights and int32 biases move; a scale only where the report names it, and only a
    # weight's (or the int32 bias scale that follows it): activation parameters never change
    assert moved and all(name.endswith("_quantized") or name in report["new_scales"] for name in moved)
    sources = storage.resolve(original)
    weight_scales = {s.scale.name for s in sources.values() if s.scale is not None}
    assert set(report["new_scales"]) <= weight_scales
    assert report["precision"] == "int8"
    assert all(np.array_equal(_scales(original)[k], v) for k, v in _scales(result.model).items()
               if k not in report["new_scales"])
    assert report["precision_gap"] > 0 and result.report["parity"]["output"]["allowance"] > 0


def test_int8_clipping_is_reported_and_large_overflow_rederives_the_weight_scale(tmp_path: Path) -> None:
    _, model = build("chain", shape=SHAPE)
    original = quantized(model, tmp_path, per_channel=True)
    sources = storage.resolve(original)
    current = storage.effective(original, sources)
    weight = next(s for s, src in sources.items() if src.stored.name == "c2.weight_quantized")
    bias = next(s for s, src in sources.items() if src.weight_slot == weight)
    scale = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "c2.weight_scale"))

    slightly = current[weight].copy()
    slightly[0].flat[0] = 127.8 * scale[0]  # rounds to 128, under a step past 127: clipped, scale kept
    written, notes = storage.write_back(original, {weight: slightly}, sources)
    assert notes.clipped == {"c2.weight_quantized": 1} and notes.new_scales == []

    tripled = current[weight] * 3  # far out of range: channel scales re-derived, bias scales follow
    written, notes = storage.write_back(original, {weight: tripled}, sources)
    assert notes.new_scales == ["c2.weight_scale", "c2.bias_quantized_scale"]
    after = storage.effective(written, sources)
    new_scale = numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == "c2.weight_scale"))
    assert np.all(np.abs(after[weight] - tripled) <= new_scale.reshape(-1, 1, 1, 1) / 2 + 1e-7)
    assert np.allclose(after[bias], current[bias], atol=float(np.max(new_scale)) * 1e-3 + 1e-6)
    unchanged = {k: v for k, v in _scales(original).items() if k not in notes.new_scales}
    assert all(np.array_equal(values(written)[k], v) for k, v in unchanged.items())  # activations never change


def test_a_weight_scale_stays_when_its_int32_bias_has_other_readers(tmp_path: Path) -> None:
    _, model = build("chain", shape=SHAPE)
    original = quantized(model, tmp_path, per_channel=True)
    sources = storage.resolve(original)
    weight = next(s for s, src in sources.items() if src.stored.name == "c2.weight_quantized")
    bias = next(s for s, src in sources.items() if src.weight_slot == weight)
    original.graph.node.append(helper.make_node("Identity", [bias], ["bias_out"], name="bias_reader"))
    original.graph.output.append(helper.make_tensor_value_info("bias_out", TensorProto.FLOAT, None))
    sources = storage.resolve(original)
    assert bias in storage.shared_storages(sources, original)
    tripled = storage.effective(original, sources)[weight] * 3
    written, notes = storage.write_back(original, {weight: tripled}, sources)
    assert notes.new_scales == [] and notes.clipped.get("c2.weight_quantized", 0) > 0
    assert changed(original, written) == {"c2.weight_quantized"}


def fake_quantized_chain() -> onnx.ModelProto:
    """The Chain with its second conv's float weight quantized when the graph runs
    (QuantizeLinear -> DequantizeLinear on the float initializer, per channel)."""
    _, model = build("chain", shape=SHAPE)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "c2.weight")
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c2.weight"))
    scale = (np.abs(weight).reshape(len(weight), -1).max(1) / 127).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(scale, "c2.w_scale"),
                                    numpy_helper.from_array(np.zeros(len(weight), np.int8), "c2.w_zero")])
    pair = [helper.make_node("QuantizeLinear", ["c2.weight", "c2.w_scale", "c2.w_zero"], ["c2.w_q"], name="q_w", axis=0),
            helper.make_node("DequantizeLinear", ["c2.w_q", "c2.w_scale", "c2.w_zero"], ["c2.w_dq"], name="dq_w", axis=0)]
    conv.input[1] = "c2.w_dq"
    nodes = [*pair, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def test_a_float_weight_quantized_at_run_time_is_written_as_float() -> None:
    original = fake_quantized_chain()
    sources = storage.resolve(original)
    assert sources["c2.w_dq"].kind == "initializer>QuantizeLinear>DequantizeLinear"
    assert not storage.analyse(original).shared
    result = clean(original, OPTIONS)
    parity_ok(result)
    assert_same_graph(original, result.model)
    moved = changed(original, result.model)
    assert "c2.weight" in moved and not moved & {"c2.w_scale", "c2.w_zero"}


def test_qoperator_model_is_refused_in_one_line(tmp_path: Path) -> None:
    _, model = build("chain", shape=SHAPE)
    original = quantized(model, tmp_path, per_channel=False, qoperator=True)
    with pytest.raises(UnsupportedModelError, match=r"QOperator-format quantized op \((QLinear|ConvInteger|MatMulInteger)\w*\).*QDQ-format"):
        clean(original, OPTIONS)
    from converters.errors import ConversionError

    default_domain = [n for n in original.graph.node if n.op_type == "QLinearConv"]
    assert default_domain and not default_domain[0].domain  # refused by the storage stage too
    with pytest.raises(ConversionError, match="QOperator-format"):
        storage.working_model(original)


def test_cli_cleans_an_int8_qdq_model_with_exit_0(tmp_path: Path) -> None:
    _, model = build("chain", shape=SHAPE)
    source = tmp_path / "int8.onnx"
    onnx.save(quantized(model, tmp_path, per_channel=True), source)
    out, report = tmp_path / "clean.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["clean", str(source), str(out), *FAST_ARGS, "--prune-ratio", "0.25",
                                       "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert_same_graph(onnx.load(source), onnx.load(out))
    written = json.loads(report.read_text())
    pytest.importorskip("jsonschema").validate(written, SCHEMA)
    assert written["storage"]["precision"] == "int8" and "precision_gap" in written["storage"]["parity_rule"]
    checked = CliRunner().invoke(main, ["verify", str(source), str(out)])
    assert checked.exit_code == 0, checked.output


def test_the_original_model_is_never_edited() -> None:
    original = constant_model()
    before = original.SerializeToString(deterministic=True)
    store = storage.analyse(original)
    assert original.SerializeToString(deterministic=True) == before
    assert {t.name for t in store.working.graph.initializer} == {"w1", "b1", "w2", "b2", "fw", "fb"}
    assert not any(n.op_type == "Constant" and n.output[0] in {"w1", "fw"} for n in store.working.graph.node)


def test_inspect_names_the_storages(tmp_path: Path) -> None:
    path = tmp_path / "constants.onnx"
    onnx.save(constant_model(), path)
    info = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).stdout)
    assert info["storage"] == {"constant": 6} and info["verdict"] == "clean would run"
    assert [layer["node"] for layer in info["layers"]] == ["conv1", "conv2", "fc"]
    text = CliRunner().invoke(main, ["inspect", str(path)]).stdout
    assert "weights stored as: 6 constant" in text
