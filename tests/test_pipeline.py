"""``clean`` end to end through the Python API on tiny models built here."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper, TensorProto

from converters.write_back import changed_initializers
from otbr_onnx import clean
from otbr_onnx.errors import UnsupportedModelError
from tests import builders
from tests.conftest import FAST

# a fixed ratio (calibration images still choose one: see the last test)
FIXED = FAST.with_(removal={"prune_ratio": 0.2})


def _strip_initializer_values(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    return copy


@pytest.mark.parametrize("kind", ["chain", "preact"])
def test_clean_changes_only_initializer_values(kind):
    _, model = builders.build(kind)
    model.doc_string = "third-party model"
    helper.set_model_props(model, {"author": "someone", "license": "x"})
    result = clean(model, FIXED)
    cleaned = result.model
    # field by field: with the values blanked the two files are the same message
    assert _strip_initializer_values(cleaned) == _strip_initializer_values(model)
    assert [n.name for n in cleaned.graph.node] == [n.name for n in model.graph.node]
    assert cleaned.opset_import == model.opset_import and cleaned.metadata_props == model.metadata_props
    assert cleaned.graph.input[0].type == model.graph.input[0].type  # dynamic batch kept
    changed = changed_initializers(model, cleaned)
    assert changed, "cleaning changed nothing"
    assert result.parity.ok and result.report["parity"]["output"]["max_abs"] <= result.parity.tolerance


@pytest.mark.parametrize("override", [dict(fusion_lambda=0.0), dict(prune_ratio=0.0)])
def test_lambda_zero_or_gamma_zero_gives_back_the_original_weights_exactly(override):
    _, model = builders.build("preact")
    cleaned = clean(model, FIXED.with_(removal=override)).model
    assert changed_initializers(model, cleaned) == []
    assert cleaned.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("kind, permute", [
    ("chain", builders.permute_chain_hidden),
    ("preact", builders.permute_preact_stream),
])
def test_permuting_hidden_neurons_gives_the_same_cleaned_function(kind, permute):
    torch_model, model = builders.build(kind)
    width = torch_model.c1.out_channels if kind == "chain" else torch_model.stem.out_channels
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(5))
    permuted = builders.export(permute(torch_model, perm), (1, 1, 8, 8))
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(builders.logits(permuted, x), builders.logits(model, x), atol=1e-5)
    a = clean(model, FIXED).model
    b = clean(permuted, FIXED).model
    assert changed_initializers(model, a)
    np.testing.assert_allclose(builders.logits(a, x), builders.logits(b, x), atol=1e-4)


def test_residual_graph_report_explains_the_ties():
    """The report's tie groups are the graph's residual Adds (the two convs feeding each), and
    the head is pinned because it reaches the graph output, as the report says."""
    _, model = builders.build("preact")
    report = clean(model, FIXED).report
    producers = {out: node.name for node in model.graph.node for out in node.output}
    adds = sorted(sorted(producers[name] for name in node.input) for node in model.graph.node if node.op_type == "Add")
    assert adds == [["/b1/c2/Conv", "/stem/Conv"], ["/b2/c2/Conv", "/b2/sc/Conv"]]  # the model's two blocks
    assert sorted(sorted(g) for g in report["channel_ties"]["groups"].values()) == adds
    assert report["channel_ties"]["pinned"] == {"/fc/Gemm": "reaches graph output 'logits'"}


def _matmul_model(trans_b_gemm: bool = False) -> onnx.ModelProto:
    """Flatten -> MatMul(W1) -> Add -> Relu -> Gemm(W2, alpha 0.5): buffers and Gemm scaling."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (3, 8) if trans_b_gemm else (8, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="head", alpha=0.5, transB=int(trans_b_gemm)),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(3, np.float32), "b2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_weights_held_as_buffers_are_unlearned_and_written_back(trans_b):
    model = _matmul_model(trans_b)
    result = clean(model, FIXED.with_(experiment={"fuse_head": True}))
    layers = {entry["node"]: entry for entry in result.report["layers"]}
    assert layers["fc1"]["score_max"] > 0  # the buffer did train
    assert layers["fc1"]["pruned"] > 0 and layers["fc1"]["fused"]
    assert {"w1", "w2"} <= set(changed_initializers(model, result.model))
    assert result.parity.ok


def test_model_without_weight_layers_is_refused():
    # class scores (N, 16), so that the missing weight layer is the only fault
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Flatten", ["r"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])],
    )
    with pytest.raises(UnsupportedModelError, match="no weight layer"):
        clean(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), FIXED)


def test_same_seed_same_bytes_and_report_and_other_seed_other_bytes():
    _, model = builders.build("preact")
    one, two = clean(model, FIXED), clean(model, FIXED)
    first = one.to_bytes()
    assert two.to_bytes() == first
    # the memory section, like the seconds, is a measurement of the process (its size varies);
    # what it decides, the images per pass, may not vary
    assert {**one.report, "seconds": None, "memory": None} == {**two.report, "seconds": None, "memory": None}
    for key in ("images_per_pass", "unlearning_micro_batch", "per_sample_bytes"):
        assert one.report["memory"][key] == two.report["memory"][key], key
    assert clean(model, FIXED.with_(run={"seed": 1})).to_bytes() != first


@pytest.mark.parametrize("budget", [0.0, 100.0])
def test_calibration_picks_the_largest_ratio_within_the_accuracy_budget(budget, tmp_path):
    _, model = builders.build("preact")
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=x, y=builders.logits(model, x).argmax(1))  # baseline: 100%
    report = clean(model, FIXED.with_(data={"calibration": str(tmp_path / "calib.npz")},
                                      removal={"max_acc_drop": budget})).report
    selection = report["ratio_selection"]
    assert selection["source"] == "calibration images" and selection["metric"] == "accuracy"
    assert selection["baseline"] == 100.0 and "calibration" not in report  # schema 2 dropped the legacy field
    within = [100.0 - t["score"] <= budget for t in selection["trials"]]
    assert all(within[:-1])  # the upward scan stops at the first ratio over budget
    expected = max(t["ratio"] for t, ok in zip(selection["trials"], within) if ok)
    assert selection["chosen_ratio"] == expected == report["pruning"]["ratio"]
    if budget == 100.0:
        assert expected == max(t["ratio"] for t in selection["trials"]) == 0.2


