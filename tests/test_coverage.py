"""Architecture coverage: every zoo family x torch exporter x opset, end to end.

For each combination ``clean`` either succeeds with onnxruntime parity, or, where the family's
``refusal`` says so (a limit outside otbr-onnx, such as a missing onnx2torch converter), refuses
with exit code 3 and the one-line message the table gives. ``fusion_lambda=0`` must give back
the input bytes. Two permutation properties show the channel-tie analysis never misaligns:

* cleaning a copy whose hidden channels were permuted (function preserved) gives the same
  cleaned function (a sub-matrix: every family, both exporters); a difference fails, whatever
  its cause (a missed tie, or fusion breaking ties between identical pruned rows by neuron
  order, which ``fuse.symmetrise`` removes: tests/test_method.py checks that directly);
* fusing such a reordered copy into the model with lambda 1 and uniform NWC gives back every
  layer exactly (pinned layers: up to the order of their own neurons, which they keep).

An exporter failure is never skipped silently: it fails the test unless ``EXPORT_FAILURES``
lists it with the reason, and then it is an explicit xfail.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converters.write_back import changed_initializers
from otbr_onnx import clean, fuse
from otbr_onnx.errors import UnsupportedModelError
from otbr_onnx.layers import find_weight_layers, to_rows
from otbr_onnx.ties import FOLLOWER, PINNED, analyse
from tests import zoo
from tests.builders import logits, weight_neurons
from tests.conftest import FAST


MATRIX = FAST.with_(removal={"iterations": 2, "batch_size": 8, "prune_ratio": 0.1})
LAMBDA_ZERO = MATRIX.with_(removal={"fusion_lambda": 0.0, "iterations": 1})
SAME_FUNCTION_ATOL = 1e-4

# (family, exporter, requested opset) -> why torch's exporter cannot write it. Empty with
# torch 2.14 / onnxscript 0.7: every combination exports.
EXPORT_FAILURES: dict[tuple[str, str, int], str] = {}

CASES = [(f, e, o) for f in zoo.FAMILIES for e in zoo.EXPORTERS for o in zoo.OPSETS]
CLEANABLE = [f for f, family in zoo.FAMILIES.items() if family.refusal is None]
# every family through both exporters, at one opset each (the exports differ far more between
# exporters than between opsets); the reordered-copy test also covers every legacy opset
PERMUTATION_CASES = [(f, e, o) for f in CLEANABLE for e, o in (("legacy", 17), ("dynamo", 18))]
REORDER_CASES = [(f, "legacy", o) for f in CLEANABLE for o in zoo.OPSETS] + [(f, "dynamo", 18) for f in CLEANABLE]


def _id(case: tuple[str, str, int]) -> str:
    family, exporter, opset = case
    suffix = "-refused" if zoo.FAMILIES[family].refusal else ""
    return f"{family}-{exporter}-op{opset}{suffix}"


@functools.lru_cache(maxsize=None)
def _export(family: str, exporter: str, opset: int, permuted: str | None) -> zoo.Exported:
    model = zoo.build(family, permuted=permuted)
    return zoo.export(model, zoo.FAMILIES[family].shape, exporter, opset)


def exported(case: tuple[str, str, int], permuted: str | None = None) -> zoo.Exported:
    """The case's ONNX model (cached), or an explicit xfail for a listed exporter failure."""
    if permuted == "tracked" and not zoo.FAMILIES[case[0]].pinned_part:
        permuted = "all"  # the same model: share the export
    try:
        return _export(*case, permuted)
    except zoo.ExportError as error:
        if case in EXPORT_FAILURES:
            pytest.xfail(f"{EXPORT_FAILURES[case]}: {error}")
        raise


@functools.lru_cache(maxsize=None)
def cleaned(case: tuple[str, str, int], permuted: str | None = None):
    """``clean`` of the case's model with ``MATRIX`` (cached: the matrix and the permutation
    tests share it)."""
    return clean(exported(case, permuted).model, MATRIX)


def probe(family: str, count: int = 16) -> np.ndarray:
    shape = zoo.FAMILIES[family].shape
    return np.random.default_rng(7).random((count,) + shape[1:], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the matrix: clean with parity (or the expected refusal), lambda 0 is the identity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_clean_keeps_parity_or_refuses_precisely(case, record_property):
    export = exported(case)
    record_property("written_opset", export.written_opset)
    refusal = zoo.FAMILIES[case[0]].refusal
    if refusal is not None:
        _assert_refused(export.model, refusal)
        return
    result = cleaned(case)
    record_property("parity_max_abs", result.parity.max_abs)
    assert result.parity.ok, result.parity
    assert changed_initializers(export.model, result.model), "cleaning changed no weight"
    report = result.report["channel_ties"]
    assert all(reason for reason in report["pinned"].values()), "every pin must say why"


def _assert_refused(model: onnx.ModelProto, refusal: zoo.Refusal) -> None:
    with pytest.raises(UnsupportedModelError) as caught:
        clean(model, MATRIX)
    message = str(caught.value)
    assert caught.value.exit_code == 3
    assert "\n" not in message and re.search(refusal.message, message), (refusal.reason, message)


@pytest.mark.parametrize("case", [c for c in CASES if zoo.FAMILIES[c[0]].refusal is None], ids=_id)
def test_lambda_zero_gives_back_the_input_exactly(case):
    model = exported(case).model
    assert clean(model, LAMBDA_ZERO).model.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# permuted hidden channels: the same cleaned function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PERMUTATION_CASES, ids=_id)
def test_permuting_hidden_channels_gives_the_same_cleaned_function(case):
    model, permuted = exported(case).model, exported(case, "all").model
    x = probe(case[0])
    np.testing.assert_allclose(logits(permuted, x), logits(model, x), atol=1e-5)  # the same function
    assert changed_initializers(model, permuted), "the permutation moved nothing"
    a, b = cleaned(case).model, cleaned(case, "all").model
    assert changed_initializers(model, a)
    gap = float(np.max(np.abs(logits(a, x) - logits(b, x))))
    assert gap <= SAME_FUNCTION_ATOL, f"the cleaned functions differ by {gap:.3g}"


# ---------------------------------------------------------------------------------------------
# a reordered copy fused into the model gives the model back: no tie is misaligned
# ---------------------------------------------------------------------------------------------


def _same_rows_in_some_order(fused: np.ndarray, expected: np.ndarray, atol: float) -> bool:
    flat_f, flat_e = fused.reshape(len(fused), -1), expected.reshape(len(expected), -1)
    distance = np.abs(flat_f[:, None, :] - flat_e[None, :, :]).max(axis=2)
    match = distance.argmin(axis=1)
    return bool(np.all(distance.min(axis=1) <= atol) and len(set(match.tolist())) == len(match))


@pytest.mark.parametrize("case", REORDER_CASES, ids=_id)
def test_fusing_a_reordered_copy_gives_back_every_layer(case):
    model, copy = exported(case).model, exported(case, "tracked").model
    layers, _ = find_weight_layers(model)
    ties = analyse(model, layers, model.graph.input[0].name, zoo.FAMILIES[case[0]].shape)
    backdoored, reordered = weight_neurons(model, layers), weight_neurons(copy, layers)
    assert any(not np.array_equal(backdoored[i].rows, reordered[i].rows) for i in backdoored)
    fused_set = {i for i in range(len(layers)) if i not in ties.heads}
    uniform = {i: np.ones(layer.out_channels) for i, layer in enumerate(layers) if ties.roles[i] != FOLLOWER}
    fused, _ = fuse.fuse(ties, backdoored, reordered, uniform, 1.0, fused_set)
    for i in sorted(fused_set):
        label = f"{layers[i].label} ({ties.roles[i]}: {ties.pin_reasons.get(i, 'transported')})"
        if ties.roles[i] == PINNED:  # keeps its own neuron order; only its inputs are realigned
            assert _same_rows_in_some_order(fused[i].rows, backdoored[i].rows, 1e-5), label
        else:
            np.testing.assert_allclose(fused[i].rows, backdoored[i].rows, atol=1e-5, err_msg=label)


# ---------------------------------------------------------------------------------------------
# what the matrix exercises, asserted directly
# ---------------------------------------------------------------------------------------------


def _ties(case: tuple[str, str, int]):
    model = exported(case).model
    layers, skipped = find_weight_layers(model)
    ties = analyse(model, layers, model.graph.input[0].name, zoo.FAMILIES[case[0]].shape)
    return {layer.label: i for i, layer in enumerate(layers)}, ties, skipped


def test_shapes_inference_cannot_see_are_taken_from_a_run():
    """The legacy exporter at opset 13 computes the ViT's reshapes through Shape/Gather chains
    that shape inference leaves unknown; they used to pin the patch conv and the whole stream."""
    labels, ties, _ = _ties(("vit", "legacy", 13))
    assert not any("unknown" in reason for reason in ties.pin_reasons.values()), ties.pin_reasons
    assert ties.roles[labels["/patch/Conv"]] != PINNED
    assert ties.groups[labels["/patch/Conv"]] == ties.groups[labels["/fc2/MatMul"]]  # the residual stream


def test_token_mixing_matmul_passes_the_channels_through():
    labels, ties, _ = _ties(("mixer", "legacy", 17))
    token_layers = [i for label, i in labels.items() if label.startswith("/MatMul")]
    assert len(token_layers) == 2
    for i in token_layers:
        assert "mixes an axis other than the tracked channels" in ties.pin_reasons[i]
    assert ties.roles[labels["/patch/Conv"]] != PINNED  # the stream survives the token mixing
    assert ties.groups[labels["/patch/Conv"]] == ties.groups[labels["/fc2/MatMul"]]


def test_each_weight_layer_kind_is_found_with_its_layout():
    kinds = {}
    for case in (("conv1d_matmul", "legacy", 17), ("upconv", "legacy", 17), ("resnext", "legacy", 17),
                 ("mobilenet_v2", "legacy", 17), ("vit", "legacy", 17)):
        model = exported(case).model
        for layer in find_weight_layers(model)[0]:
            kinds.setdefault((layer.op_type, layer.layout, len(layer.kernel)), layer)
    assert {("Conv", "conv", 1), ("Conv", "conv", 2), ("ConvTranspose", "conv_t", 2), ("MatMul", "out_in", 0),
            ("MatMul", "in_out", 0), ("Gemm", "in_out", 0), ("Gemm", "out_in", 0)} <= set(kinds)
    depthwise = [l for l in find_weight_layers(exported(("mobilenet_v2", "legacy", 17)).model)[0] if l.is_depthwise]
    grouped = [l for l in find_weight_layers(exported(("resnext", "legacy", 17)).model)[0] if l.is_grouped]
    assert len(depthwise) == 2 and len(grouped) == 1


def test_nhwc_input_is_transposed_then_cleaned():
    model = exported(("nhwc", "legacy", 17)).model
    assert model.graph.node[0].op_type == "Transpose" and model.graph.node[0].input[0] == "input"
    labels, ties, _ = _ties(("nhwc", "legacy", 17))
    assert ties.roles[labels["/c1/Conv"]] != PINNED and ties.inputs[labels["/c2/Conv"]] is not None


# ---------------------------------------------------------------------------------------------
# weight layers the exporters above do not write
# ---------------------------------------------------------------------------------------------


def _graph(nodes, inits, opset: int = 17) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_conv_transpose_neurons_are_axis_one_of_its_weight():
    from onnx import helper

    weight = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)  # [C_in, C_out, k, k]
    model = _graph([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", strides=[2, 2])],
                   {"w": weight, "b": np.zeros(3)})
    (layer,), skipped = find_weight_layers(model)
    assert not skipped and (layer.out_channels, layer.in_channels, layer.layout) == (3, 2, "conv_t")
    rows = to_rows(layer, weight)
    assert rows.shape == (3, 2, 2, 2) and np.array_equal(rows[1], weight[:, 1])
    from otbr_onnx.layers import from_rows

    assert np.array_equal(from_rows(layer, rows), weight)


def test_grouped_conv_transpose_is_skipped_with_its_reason():
    from onnx import helper

    model = _graph([helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="up", group=2),
                    helper.make_node("Conv", ["t", "c"], ["y"], name="conv")],
                   {"w": np.ones((2, 1, 2, 2)), "c": np.ones((3, 2, 1, 1))})
    layers, skipped = find_weight_layers(model)
    assert [layer.label for layer in layers] == ["conv"]
    assert skipped[0].node_name == "up" and "grouped ConvTranspose (group=2)" in skipped[0].reason


def _constant(name: str, value: np.ndarray):
    from onnx import helper

    return helper.make_node("Constant", [], [name], name=f"{name}_node",
                            value=numpy_helper.from_array(value.astype(np.float32), name))


def test_weights_held_in_constant_nodes_are_refused_naming_a_node():
    from onnx import helper

    model = _graph([_constant("w", np.ones((3, 2, 1, 1))), helper.make_node("Conv", ["x", "w"], ["y"], name="c")], {})
    with pytest.raises(UnsupportedModelError, match=r"all 1 weight layers keep their weights in Constant nodes.*"
                                                    r"Conv 'c'") as caught:
        find_weight_layers(model)
    assert caught.value.exit_code == 3


def test_a_constant_node_weight_beside_initializer_weights_is_skipped_not_refused():
    from onnx import helper

    model = _graph([_constant("w", np.ones((3, 2, 1, 1))), helper.make_node("Conv", ["x", "w"], ["h"], name="c1"),
                    helper.make_node("Conv", ["h", "v"], ["y"], name="c2")], {"v": np.ones((3, 3, 1, 1))})
    layers, skipped = find_weight_layers(model)
    assert [layer.label for layer in layers] == ["c2"]
    assert skipped[0].node_name == "c1" and "Constant node 'w_node'" in skipped[0].reason
