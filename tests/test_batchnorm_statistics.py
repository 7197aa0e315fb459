"""BatchNorm statistics that a remover re-estimates, and their way back into the original graph:
``converters.storage.resolve_statistics``, ``converters.to_torch.batchnorm_refs``, ``emit``, and
the adversarial remover's train-mode BatchNorm (the model handed back is its own recalibration)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from builders import build, quadrant_images
from converters import storage
from otbr_onnx import CleanOptions, triggers
from otbr_onnx.emit import emit
from otbr_onnx.prepare import prepare
from otbr_onnx.removers import adversarial
from otbr_onnx.robustness import batchnorm_layers, recalibrate, recalibrate_in_place


def _batchnorm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "BatchNormalization"]


def test_every_batchnorm_of_a_preact_graph_has_its_four_statistics_resolved() -> None:
    _, model = build("preact")
    nodes = _batchnorm_nodes(model)
    assert nodes  # pre-activation BatchNorm cannot be folded into the conv after the ReLU
    found = storage.resolve_statistics(model)
    assert set(found) == {name for node in nodes for name in node.input[1:5]}
    assert not set(found) & set(storage.resolve(model))  # statistics are not weight slots


def test_statistics_another_node_reads_or_stored_in_float16_are_left_out() -> None:
    _, model = build("preact")
    first, second = _batchnorm_nodes(model)[:2]
    second.input[3] = first.input[3]  # two BatchNorms read one running mean
    tensor = next(t for t in model.graph.initializer if t.name == second.input[4])
    half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
    tensor.CopyFrom(half)
    found = storage.resolve_statistics(model)
    assert not {first.input[3], second.input[3], second.input[4]} & set(found)
    assert first.input[1] not in found  # a node is all four or nothing
    others = [n for n in _batchnorm_nodes(model) if n not in (first, second)]
    assert all(name in found for node in others for name in node.input[1:5])


def test_new_statistics_are_written_into_the_original_graph_and_pass_parity() -> None:
    _, model = build("preact")
    prepared = prepare(model, CleanOptions())
    node = _batchnorm_nodes(model)[0]
    mean, var = node.input[3], node.input[4]
    assert mean in prepared.refs and var in prepared.refs
    weights = {mean: prepared.original[mean] + 0.25, var: prepared.original[var] * 1.5}
    written_model = emit(prepared, weights)
    cleaned = written_model.model
    assert written_model.parity.ok
    assert [n.op_type for n in cleaned.graph.node] == [n.op_type for n in model.graph.node]
    written = {t.name: numpy_helper.to_array(t) for t in cleaned.graph.initializer}
    np.testing.assert_array_equal(written[mean], weights[mean])
    np.testing.assert_array_equal(written[var], weights[var])
    unchanged = [t.name for t in model.graph.initializer if t.name not in weights]
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(np.array_equal(written[name], original[name]) for name in unchanged)


def test_writable_batchnorm_needs_every_layer() -> None:
    _, model = build("preact")
    assert adversarial.writable_batchnorm(prepare(model, CleanOptions()))
    first, second = _batchnorm_nodes(model)[:2]
    second.input[3] = first.input[3]
    assert not adversarial.writable_batchnorm(prepare(model, CleanOptions()))


def test_in_place_recalibration_matches_the_users_recalibration() -> None:
    module, _ = build("preact")
    x, _ = quadrant_images(96, seed=4)
    expected = recalibrate(module, x, batch=32)
    norms = batchnorm_layers(module)
    recalibrate_in_place(module.eval(), torch.from_numpy(x), 32)  # a tensor, as the remover passes
    for mine, theirs in zip(norms, batchnorm_layers(expected)):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)
        assert not mine.training


def test_unlearning_in_train_mode_hands_back_its_own_recalibration() -> None:
    """After train-mode unlearning the kept student's statistics are those of its training
    images: recalibrating it on them changes nothing."""
    module, _ = build("preact")
    x, _ = quadrant_images(80, seed=6)
    weights = [module.stem.weight, module.fc.weight, module.fc.bias]
    config = adversarial.AdversarialConfig(rounds=2, train_steps=3, batch=16, search=triggers.Search(steps=2),
                                           families=("additive",))
    student, log = adversarial.unlearn(module, weights, x, [1], lambda m, b: m(b), (0.0, 1.0), 100.0, config,
                                       writable_batchnorm=True)
    assert log.batchnorm == "train" and log.chosen >= 1
    train, _ = adversarial._split(len(x), config.holdout, config.seed)
    again = recalibrate(student, x[train.numpy()], batch=config.batch)
    moved = False
    for mine, theirs, before in zip(batchnorm_layers(student), batchnorm_layers(again), batchnorm_layers(module)):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.running_var, theirs.running_var, atol=1e-5, rtol=1e-4)
        moved |= not torch.allclose(mine.running_mean, before.running_mean)
    assert moved  # the statistics were re-estimated, not left as stored
    untouched = build("preact")[0]  # the input module is never written to
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), untouched.state_dict().values()))


def test_unlearning_without_writable_batchnorm_keeps_the_stored_statistics() -> None:
    module, _ = build("preact")
    x, _ = quadrant_images(40, seed=7)
    config = adversarial.AdversarialConfig(rounds=1, train_steps=2, batch=16, search=triggers.Search(steps=2),
                                           families=("additive",))
    student, log = adversarial.unlearn(module, [module.fc.weight], x, [1], lambda m, b: m(b), (0.0, 1.0), 100.0,
                                       config, writable_batchnorm=False)
    assert log.batchnorm == "eval"
    for mine, before in zip(batchnorm_layers(student), batchnorm_layers(module)):
        assert torch.equal(mine.running_mean, before.running_mean) and torch.equal(mine.weight, before.weight)
