"""Fast checks of otbr_onnx.evaluate (ACC, ASR, RA, DER) on a tiny ONNX model whose predictions we choose.

The model is Flatten -> Gemm with a permutation weight, so an input that is one-hot at class c
predicts PERM[c]: the expected metrics follow from the inputs alone, no training, no dataset.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from otbr_onnx.evaluate import Metrics, der, evaluate, predict

CLASSES = 4
TARGET = 0
# logits[j] = sum_c x[c] * W[c, j]; W[c, PERM[c]] = 1, so one-hot c predicts PERM[c].
PERM = np.array([2, 0, 3, 1])


def permutation_model() -> onnx.ModelProto:
    """(N, 1, 1, CLASSES) -> Flatten -> Gemm(W, b=0) -> (N, CLASSES): a non-identity map, to catch axis mix-ups."""
    weight = np.zeros((CLASSES, CLASSES), dtype=np.float32)
    weight[np.arange(CLASSES), PERM] = 1.0
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        ],
        "permutation",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 1, CLASSES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def inputs_predicting(predictions: list[int]) -> np.ndarray:
    """Inputs that the permutation model classifies as ``predictions`` (one-hot at PERM's preimage)."""
    inverse = np.argsort(PERM)
    x = np.zeros((len(predictions), 1, 1, CLASSES), dtype=np.float32)
    x[np.arange(len(predictions)), 0, 0, inverse[predictions]] = 1.0
    return x


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return permutation_model()


def test_predict_follows_the_weights_across_batches(model: onnx.ModelProto) -> None:
    wanted = [3, 1, 0, 2, 2, 1, 0]
    # batch_size 3 splits 7 samples unevenly: the pieces must be put back in order.
    assert predict(model, inputs_predicting(wanted), batch_size=3).tolist() == wanted


def test_accuracy_counts_correct_predictions(model: onnx.ModelProto) -> None:
    y = np.array([0, 1, 2, 3, 1])
    x = inputs_predicting([0, 1, 2, 0, 3])  # 3 of 5 right
    metrics = evaluate(model, (x, y), None, TARGET)
    assert metrics.acc == pytest.approx(60.0)
    assert (metrics.asr, metrics.ra) == (None, None)
    assert (metrics.clean_samples, metrics.poisoned_samples) == (5, 0)


def test_asr_and_ra_ignore_target_class_images(model: onnx.ModelProto) -> None:
    clean = (inputs_predicting([1, 2]), np.array([1, 2]))
    # Six triggered images: two are truly of the target class (predicted as the target: they must
    # NOT count as attack successes), four are not: two hit the target, one keeps its true label,
    # one goes to a third class.
    y_true = np.array([TARGET, 1, TARGET, 2, 3, 1])
    predicted = [TARGET, TARGET, TARGET, TARGET, 3, 2]
    metrics = evaluate(model, clean, (inputs_predicting(predicted), y_true), TARGET)
    assert metrics.poisoned_samples == 4
    assert metrics.asr == pytest.approx(50.0)  # 2 of 4, not 4 of 6
    assert metrics.ra == pytest.approx(25.0)  # 1 of 4
    assert metrics.acc == pytest.approx(100.0)


def test_asr_respects_a_nonzero_target(model: onnx.ModelProto) -> None:
    y_true = np.array([0, 1, 2, 3])
    predicted = [2, 2, 2, 1]  # target 2: images 0 and 1 hit it, image 2 is of the target class
    metrics = evaluate(model, (inputs_predicting([0]), np.array([0])), (inputs_predicting(predicted), y_true), 2)
    assert metrics.poisoned_samples == 3
    assert metrics.asr == pytest.approx(100.0 * 2 / 3)
    assert metrics.ra == pytest.approx(0.0)


def metrics(acc: float, asr: float | None) -> Metrics:
    return Metrics(acc=acc, asr=asr, ra=None, clean_samples=1, poisoned_samples=1)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((90.0, 100.0), (88.0, 4.0), (0.96 - 0.02 + 1.0) / 2.0),  # the usual case: 0.97
        ((90.0, 100.0), (90.0, 0.0), 1.0),  # perfect defense
        ((100.0, 50.0), (0.0, 50.0), 0.0),  # ASR untouched, all accuracy lost: the floor
        ((90.0, 10.0), (91.0, 20.0), 0.5),  # ASR rose and ACC rose: both clamped to 0, not rewarded
        ((90.0, 95.0), (80.0, 5.0), (0.90 - 0.10 + 1.0) / 2.0),  # an ACC drop costs as much as ASR gains
    ],
)
def test_der_formula(before: tuple, after: tuple, expected: float) -> None:
    assert der(metrics(*before), metrics(*after)) == pytest.approx(expected)


def test_der_stays_in_0_1_at_every_extreme() -> None:
    """The clamps keep DER in [0, 1] where the plain formula leaves it: ASR rising (0 -> 100)
    with ACC falling (100 -> 0) would give (-1 - 1 + 1) / 2 = -0.5, and ACC rising while ASR
    falls would give above 1."""
    ends = (0.0, 50.0, 100.0)
    ratings = [der(metrics(acc0, asr0), metrics(acc1, asr1))
               for acc0 in ends for asr0 in ends for acc1 in ends for asr1 in ends]
    assert min(ratings) == 0.0 and max(ratings) == 1.0
    assert der(metrics(100.0, 0.0), metrics(0.0, 100.0)) == 0.0  # -0.5 unclamped
    assert der(metrics(0.0, 100.0), metrics(100.0, 0.0)) == 1.0  # 1.5 unclamped: an ACC gain is not rewarded


def test_der_is_none_without_asr() -> None:
    assert der(metrics(90.0, None), metrics(89.0, None)) is None
    assert der(metrics(90.0, 100.0), metrics(89.0, None)) is None


def test_der_from_evaluated_models(model: onnx.ModelProto) -> None:
    """End to end: DER from two evaluations of the same model on different sets."""
    clean = (inputs_predicting([1, 2, 3, 1]), np.array([1, 2, 3, 3]))  # 75% ACC
    poisoned = (inputs_predicting([0, 0, 0, 1]), np.array([1, 2, 3, 1]))  # 75% ASR
    before = evaluate(model, clean, poisoned, TARGET)
    after = evaluate(model, (inputs_predicting([1, 2, 3, 3]), clean[1]), (inputs_predicting([1, 2, 3, 1]), poisoned[1]), TARGET)
    assert (before.acc, before.asr, after.acc, after.asr) == pytest.approx((75.0, 75.0, 100.0, 0.0))
    assert der(before, after) == pytest.approx((0.75 + 1.0) / 2.0)


def test_text_metadata_beside_the_arrays_is_read_and_images_stay_numeric(tmp_path):
    """models/demo_eval.npz names its attack in a text array: that is data, not a refusal."""
    from otbr_onnx.errors import UsageError
    from otbr_onnx.evaluate import load_npz, split_sets

    x, y = np.zeros((4, 1, 8, 8), np.float32), np.arange(4)
    np.savez(tmp_path / "meta.npz", x=x, y=y, attack=np.array("badnets"))
    data = load_npz(tmp_path / "meta.npz")
    assert str(data["attack"]) == "badnets" and split_sets(data, None)[0][0].shape == (4, 1, 8, 8)
    np.savez(tmp_path / "text.npz", x=np.array(["a"] * 4), y=y)
    with pytest.raises(UsageError, match="array 'x' has dtype <U1"):
        split_sets(load_npz(tmp_path / "text.npz"), None)
