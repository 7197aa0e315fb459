"""Binary classifiers with one output column (``converters/single_score.py``): a raw logit
(N, 1), or a Sigmoid probability (N, 1). They are cleaned as two-class models through a working
copy, and the written model keeps its single column, its graph and parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from builders import Chain, export, logits
from conftest import FAST, FAST_ARGS
from converters.single_score import single_score_kind, two_class_graph, two_class_scores
from otbr_onnx import clean
from otbr_onnx.cli import main
from otbr_onnx.evaluate import predict
from otbr_onnx.load import load_proto
from otbr_onnx.verify import verify
from test_storage import assert_same_graph

SHAPE = (1, 1, 8, 8)


class WithSigmoid(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.inner(x))


def images(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *SHAPE[1:]), dtype=np.float32)


def single_column(kind: str, seed: int = 0) -> onnx.ModelProto:
    """A Chain whose head has one output: its logit, or that logit through a Sigmoid. The bias
    puts the threshold at the median of random images, so both answers occur."""
    torch.manual_seed(seed)
    model = Chain(classes=1)
    with torch.no_grad():
        model.fc.bias -= model(torch.from_numpy(images(64, seed=seed + 10))).median()
    return export(WithSigmoid(model) if kind == "probability" else model, SHAPE)


@pytest.mark.parametrize("kind", ["logit", "probability"])
def test_working_copy_widens_the_column_as_numpy_does(kind: str) -> None:
    model = single_column(kind)
    assert single_score_kind(model.graph, "logits") == kind
    x = images(16)
    column = logits(model, x)
    widened = logits(two_class_graph(model, "logits", kind), x)
    assert column.shape == (16, 1) and widened.shape == (16, 2)
    np.testing.assert_array_equal(widened, two_class_scores(column, kind))
    if kind == "logit":  # softmax of [0, z] is the sigmoid's own probability of class 1
        soft = np.exp(widened) / np.exp(widened).sum(1, keepdims=True)
        np.testing.assert_allclose(soft[:, 1], 1 / (1 + np.exp(-column[:, 0])), rtol=1e-5)
    else:
        np.testing.assert_allclose(widened.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["logit", "probability"])
def test_load_reads_one_column_as_two_classes(kind: str) -> None:
    loaded = load_proto(single_column(kind))
    assert loaded.single_score == kind
    assert loaded.output_is_probability is (kind == "probability")
    assert [d.dim_value for d in loaded.working.graph.output[0].type.tensor_type.shape.dim][1:] == [2]
    assert [d.dim_value for d in loaded.proto.graph.output[0].type.tensor_type.shape.dim][1:] == [1]


@pytest.mark.parametrize("kind", ["logit", "probability"])
def test_clean_keeps_the_single_column_graph_with_parity(kind: str) -> None:
    model = single_column(kind)
    result = clean(model, FAST.with_(removal={"prune_ratio": 0.25}))
    assert result.changed
    assert_same_graph(model, result.model)
    x = images(32)
    before, after = logits(model, x), logits(result.model, x)
    assert after.shape == (32, 1) and np.isfinite(after).all()
    assert not np.allclose(before, after)  # the weights did change
    report = result.report
    assert report["input"]["single_score"] == kind and report["input"]["classes"] == 2
    assert report["parity"]["output"]["ok"] and report["parity"]["output"]["max_abs"] < 1e-4
    assert report["scan"]["verdict"] == "inconclusive"


def test_predict_and_verify_use_the_threshold_not_argmax() -> None:
    """argmax over one column is always 0; class 1 is a positive logit (or p > 0.5)."""
    for kind in ("logit", "probability"):
        model = single_column(kind, seed=1)
        x = images(64)
        column = logits(model, x)[:, 0]
        expected = (column > (0.0 if kind == "logit" else 0.5)).astype(int)
        assert 0 < expected.sum() < 64  # both answers occur, so the threshold is what is tested
        np.testing.assert_array_equal(predict(model, x), expected)
        flipped = onnx.ModelProto()
        flipped.CopyFrom(model)
        gemm = next(n for n in flipped.graph.node if n.op_type == "Gemm")
        for tensor in flipped.graph.initializer:
            if tensor.name in gemm.input[1:]:
                tensor.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(tensor), tensor.name))
        # negating the logit flips every answer: agreement 0, where argmax of one column says 1
        assert verify(model, flipped, "input", SHAPE, samples=32).top1_agreement == 0.0


def test_cli_cleans_a_single_logit_model(tmp_path: Path) -> None:
    source = tmp_path / "binary.onnx"
    onnx.save(single_column("logit"), source)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["clean", str(source), str(out), "--report", str(report), *FAST_ARGS,
                                       "--prune-ratio", "0.25"])
    assert result.exit_code == 0, result.output
    written = onnx.load(out)
    assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim][1:] == [1]
    assert json.loads(report.read_text())["parity"]["output"]["ok"]
    shown = CliRunner().invoke(main, ["inspect", str(source)])
    assert shown.exit_code == 0 and "one logit" in shown.output
