"""Fixed batch sizes and the memory budget (otbr_onnx/sizing.py, load.batch_plan).

A model whose input declares a fixed batch is cleaned without changing its graph: through a
dynamic-batch working copy where the graph allows it, else at its own batch size (every pass,
unlearning chunk and parity run padded to it). The micro-batch comes from ``--max-memory``,
and where no BatchNorm runs in train mode the results do not depend on it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from converters import runtime
from converters.write_back import changed_initializers
from otbr_onnx.cli import main
from otbr_onnx.sizing import BatchPlan, Chunking, parse_size
from tests import builders
from tests.conftest import FAST, FAST_ARGS



class BatchInReshape(nn.Module):
    """conv -> relu -> conv -> relu -> maxpool -> Reshape(batch, -1) -> fc: the exporter writes
    the batch size into the Reshape's constant shape, so no other batch size runs."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)
        return self.fc(x.reshape(self.batch, -1))


def chain_fixed() -> onnx.ModelProto:
    torch.manual_seed(0)
    return builders.export(builders.Chain(), (1, 1, 8, 8), dynamic_batch=False)


def reshape_fixed(batch: int = 1) -> onnx.ModelProto:
    torch.manual_seed(0)
    return builders.export(BatchInReshape(batch), (batch, 1, 8, 8), dynamic_batch=False)


def _clean_cli(model: onnx.ModelProto, tmp_path, *extra: str) -> tuple[int, str, dict | None]:
    source, output, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, source)
    result = CliRunner().invoke(main, ["clean", str(source), str(output), "--report", str(report), "--quiet",
                                       "--device", "cpu", *FAST_ARGS, *extra])
    data = json.loads(report.read_text()) if result.exit_code == 0 else None
    return result.exit_code, result.stderr, data


def _assert_same_graph_new_weights(original: onnx.ModelProto, cleaned: onnx.ModelProto) -> None:
    for field in ("node", "input", "output", "value_info"):
        assert [m.SerializeToString() for m in getattr(cleaned.graph, field)] == \
               [m.SerializeToString() for m in getattr(original.graph, field)], field
    assert changed_initializers(original, cleaned), "cleaning changed no weight"


@pytest.mark.parametrize("build, path", [(chain_fixed, "made dynamic"), (reshape_fixed, "fixed"),
                                         (lambda: reshape_fixed(3), "fixed")],
                         ids=["batch1-dynamic-able", "batch1-reshape", "batch3-reshape"])
def test_fixed_batch_model_is_cleaned_with_its_graph_and_shapes_unchanged(build, path, tmp_path):
    model = build()
    declared = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    code, stderr, report = _clean_cli(model, tmp_path)
    assert code == 0, stderr
    assert report["input"]["batch"]["path"] == path
    assert report["input"]["batch"]["declared"] == declared
    assert (report["input"]["batch"]["reason"] is None) == (path == "made dynamic")
    assert report["parity"]["output"]["ok"] and report["parity"]["output"]["samples"] == 8
    cleaned = onnx.load(tmp_path / "out.onnx")
    _assert_same_graph_new_weights(model, cleaned)
    assert cleaned.graph.input[0].type.tensor_type.shape.dim[0].dim_value == declared  # still fixed
    if path == "fixed":  # every pass at the model's own size, whatever the memory allows
        assert report["memory"]["images_per_pass"] == declared
        assert report["memory"]["unlearning_micro_batch"] == declared


def test_a_batch_hardcoding_reshape_is_detected_and_its_converted_module_runs_at_batch_one():
    from otbr_onnx.load import load_proto
    from otbr_onnx.prepare import prepare

    model = reshape_fixed(1)
    loaded = load_proto(model)
    assert loaded.batch.path == "fixed" and loaded.working is loaded.proto
    assert "batch 2" in loaded.batch.reason
    prepared = prepare(model, FAST.with_(run={"device": "cpu"}))
    x = runtime.random_inputs(loaded.input_shape, 1, seed=3)
    with torch.no_grad():  # onnx2torch keeps the constant [1, -1] shape: batch 1 is what it runs
        torch_out = prepared.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_out, builders.logits(model, x), rtol=1e-4, atol=1e-5)
    assert prepared.chunking == Chunking(1, True)


def test_made_dynamic_copy_changes_only_shapes_and_the_input_model_is_untouched():
    from otbr_onnx.load import load_proto

    model = chain_fixed()
    before = model.SerializeToString()
    loaded = load_proto(model)
    assert loaded.batch == BatchPlan(1, "made dynamic")
    working = loaded.working
    assert working.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert working.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    assert [n.SerializeToString() for n in working.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert list(working.graph.initializer) == list(model.graph.initializer)
    assert loaded.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert model.SerializeToString() == before
    x = runtime.random_inputs(loaded.input_shape, 5, seed=0)  # the copy runs any batch size
    np.testing.assert_allclose(builders.logits(working, x),
                               np.concatenate([builders.logits(model, x[i:i + 1]) for i in range(5)]),
                               rtol=1e-5, atol=1e-6)


def test_runtime_run_feeds_a_fixed_batch_in_padded_chunks():
    model = reshape_fixed(3)
    session = runtime.session(model)
    assert runtime.fixed_batch(session, "input") == 3
    x = runtime.random_inputs((1, 1, 8, 8), 7, seed=0)  # 3 + 3 + 1 (padded to 3)
    out = runtime.run(session, "input", "logits", x)
    assert out.shape == (7, 4)
    first = builders.logits(model, x[:3])
    np.testing.assert_allclose(out[:3], first, rtol=1e-6, atol=1e-7)
    last = builders.logits(model, np.concatenate([x[6:7]] * 3))[0]
    np.testing.assert_allclose(out[6], last, rtol=1e-6, atol=1e-7)


def test_chunking_pads_with_the_last_image_only_when_the_size_is_exact():
    x = np.arange(5, dtype=np.float32)[:, None]
    assert list(Chunking(2).spans(5)) == [(0, 2), (2, 4), (4, 5)]
    assert Chunking(2).pad(x[4:]).shape == (1, 1)
    padded = Chunking(3, True).pad(torch.from_numpy(x[3:]))
    assert padded[:, 0].tolist() == [3.0, 4.0, 4.0]


def _chain_module():
    from converters.to_torch import convert

    _, model = builders.build("chain")
    return convert(model).eval()


def test_scan_margins_do_not_depend_on_the_images_per_pass():
    from otbr_onnx.detectors.margin import ScanConfig, maximise_margins

    module = _chain_module()
    runs = [maximise_margins(module, (1, 1, 8, 8), np.arange(4), 3, 6, ScanConfig(batch=batch, exact=exact), 0, False)
            for batch, exact in ((256, False), (5, False), (5, True))]
    for other in runs[1:]:
        np.testing.assert_allclose(other.margins, runs[0].margins, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(other.inputs, runs[0].inputs, rtol=1e-5, atol=1e-5)
    assert np.ptp(runs[0].margins) > 0  # the search moved


def test_probes_do_not_depend_on_the_images_per_pass_without_batchnorm():
    from otbr_onnx.probes import ProbeConfig, synthesise_probes

    module = _chain_module()
    whole = synthesise_probes(module, (1, 1, 8, 8), 4, 0, False, ProbeConfig(count=12, steps=5))
    for chunking in (Chunking(5), Chunking(5, True)):
        chunked = synthesise_probes(module, (1, 1, 8, 8), 4, 0, False, ProbeConfig(count=12, steps=5, chunking=chunking))
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_padded_unlearning_chunks_accumulate_the_whole_batch_gradient():
    from converters.to_torch import weight_refs
    from otbr_onnx.layers import find_weight_layers
    from otbr_onnx.unlearn import UnlearnConfig, random_unlearning

    _, model = builders.build("chain")
    module = _chain_module()
    refs = weight_refs(module, model, find_weight_layers(model)[0])
    whole, _ = random_unlearning(module, refs, (1, 1, 8, 8), 4, 0, False, UnlearnConfig(iterations=3, batch_size=12, lr=1e-2))
    padded, _ = random_unlearning(module, refs, (1, 1, 8, 8), 4, 0, False,
                                  UnlearnConfig(iterations=3, batch_size=12, lr=1e-2, micro_batch=5, exact=True))
    for name in refs:
        np.testing.assert_allclose(padded[name], whole[name], rtol=1e-5, atol=1e-7)


def test_the_memory_budget_chooses_the_micro_batch_and_the_report_says_so(tmp_path):
    from otbr_onnx.pipeline import clean

    _, model = builders.build("chain")
    roomy = clean(model, FAST.with_(run={"device": "cpu", "max_memory": 64 * 1024**3})).report["memory"]
    assert roomy["source"] == "--max-memory" and roomy["images_per_pass"] == 256
    assert roomy["unlearning_micro_batch"] is None  # the whole batch of 16 fits: no chunking
    # a budget the process already exceeds: one image per pass, flagged as over budget
    tight = clean(model, FAST.with_(run={"device": "cpu", "max_memory": 1024})).report["memory"]
    assert tight["micro_batch"] == 1 and tight["images_per_pass"] == 1 and tight["over_budget"]
    assert tight["unlearning_micro_batch"] == 1
    assert tight["per_sample_bytes"] == roomy["per_sample_bytes"] > 6 * 8 * 8 * 4  # at least c1's output
    assert roomy["scan_block"] is None and tight["scan_block"] == 1  # the search state: all images, or one
    assert roomy["probe_micro_batch"] >= 256 and tight["probe_micro_batch"] == 1


def test_the_margin_search_is_blocked_when_its_state_would_crowd_the_budget():
    """ImageNet's 1000 classes at 224x224: screening holds 1000 images' search state (u, its
    gradient, two Adam moments, the best input, the draw), about 3.4 GiB; a quarter of the room
    holds a block. Four classes x 8 starts fit whole."""
    from otbr_onnx.sizing import SEARCH_SHARE, SEARCH_STATE_COPIES, search_block

    image, room = 3 * 224 * 224 * 4, 1024 * 2**20
    state = SEARCH_STATE_COPIES * image
    block, held = search_block(room, image, 1000)
    assert block is not None and block * state <= SEARCH_SHARE * room < (block + 1) * state
    assert held == block * state < 1000 * state
    assert search_block(room, image, 32) == (None, 32 * state)
    assert search_block(-5, image, 32) == (1, state)  # no room at all: one image at a time


def test_default_budget_is_two_gib_or_half_the_available_memory():
    from otbr_onnx.sizing import DEFAULT_MAX_MEMORY, available_memory, default_budget

    budget, source = default_budget("cpu")
    free = available_memory("cpu")
    assert budget == min(DEFAULT_MAX_MEMORY, int(free * 0.5)) if free else budget == DEFAULT_MAX_MEMORY
    assert source.startswith("default")


@pytest.mark.parametrize("text, expected", [("2G", 2 * 1024**3), ("512M", 512 * 1024**2), ("1.5GiB", 3 * 1024**3 // 2),
                                            ("1000", 1000), ("64kb", 65536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("value", ["abc", "0", "-1G", "nan"])
def test_a_bad_max_memory_is_a_one_line_usage_error(value, tmp_path):
    result = CliRunner().invoke(main, ["clean", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--max-memory", value])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-memory" in lines[0], result.stderr
