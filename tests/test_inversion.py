"""Trigger inversion on the user's images (``otbr_onnx.detectors.inversion``), its wiring into
``detect``/``scan --data`` and the rescan, on the tests' tiny BadNets MLP and its clean twin (8x8
images, a 2x2 checkerboard trigger: 6% of the pixels, so the patch budget is raised to 7%)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from otbr_onnx import CleanOptions, DataOptions, ScanOptions, scan
from otbr_onnx.detect import ScanResult, combine, rescan_module
from otbr_onnx.detectors.inversion import DETECTOR, InversionConfig, invert_module, robust_z, subsample
from otbr_onnx.triggers import Patch, make
from tests import builders

TARGET = 2
# The defaults but a patch budget that fits the tiny model's 2x2 trigger on 8x8 images
TINY = InversionConfig(patch_area=0.07)
QUICK = CleanOptions(scan=ScanOptions(starts=2, steps=20), data=DataOptions(probes=16))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return builders.block_images(200, seed=7)[0]


@pytest.fixture(scope="module")
def backdoored_result(images):
    return invert_module(builders.build_backdoored(TARGET)[0], images, 8, config=TINY)


@pytest.fixture(scope="module")
def twin_result(images):
    return invert_module(builders.build_backdoored(None)[0], images, 8, config=TINY)


def test_the_backdoor_target_is_flagged_by_the_patch_family(backdoored_result):
    assert backdoored_result.suspected[:1] == [TARGET]
    assert "patch" in backdoored_result.evidence[TARGET]
    # the target stands out: its patch z is far above every other class's
    others = np.delete(backdoored_result.z["patch"], TARGET)
    assert backdoored_result.z["patch"][TARGET] > 2 * max(others.max(), 1.0)
    assert backdoored_result.flipped["patch"][TARGET] > 0.95
    assert not backdoored_result.cleared(TARGET)


def test_the_clean_twin_is_not_flagged(twin_result):
    assert twin_result.suspected == []
    assert twin_result.cleared(TARGET)
    assert twin_result.triggers == {}


def test_the_recovered_trigger_is_a_patch_within_budget_where_the_stamp_is(backdoored_result):
    trigger = backdoored_result.triggers[TARGET]
    assert trigger["family"] == "patch"
    mask = trigger["mask"]
    assert mask.shape == (8, 8) and mask.mean() <= TINY.patch_area + 1e-6
    # the mask covers the stamp's two white pixels (the checkerboard's diagonal), and its pattern
    # is white there
    assert mask[6, 6] > 0.5 and mask[7, 7] > 0.5
    assert trigger["pattern"][0, 6, 6] > 0.8 and trigger["pattern"][0, 7, 7] > 0.8


def test_as_dict_is_json_and_says_what_flagged(backdoored_result):
    text = json.dumps(backdoored_result.as_dict())
    back = json.loads(text)
    assert back["triggers"][str(TARGET)]["family"] == "patch"
    assert np.asarray(back["triggers"][str(TARGET)]["picture"]).shape == (8, 8)
    assert back["suspected_targets"] == [TARGET]
    assert "patch" in back["evidence"][str(TARGET)]
    assert back["classes"][TARGET]["patch"]["z"] > back["thresholds"]["patch"]
    assert back["images"] == 200


def test_the_search_is_deterministic_and_subsampled(images):
    module = builders.build_backdoored(TARGET)[0]
    config = replace(TINY, images=50, steps=10, families=("additive",))
    first = invert_module(module, images, 8, config=config)
    second = invert_module(module, images, 8, config=config)
    assert first.images == 50 and len(subsample(images, config)) == 50
    np.testing.assert_array_equal(first.margins["additive"], second.margins["additive"])


def test_classes_searched_in_blocks_give_the_one_pass_result(images):
    module = builders.build_backdoored(TARGET)[0]
    config = replace(TINY, steps=8, families=("patch",))
    whole = invert_module(module, images, 8, config=config)  # 8 classes x 16 images: one pass
    blocks = invert_module(module, images, 8, config=replace(config, chunk=32))  # 2 classes per pass
    np.testing.assert_allclose(blocks.margins["patch"], whole.margins["patch"], rtol=1e-4, atol=1e-4)


def test_too_many_classes_or_flat_images_skip_the_inversion(monkeypatch, images):
    from otbr_onnx import detect as detecting
    from otbr_onnx.detectors import inversion
    from otbr_onnx.prepare import prepare
    options = QUICK
    prepared = prepare(builders.build_backdoored(TARGET)[1], options)
    monkeypatch.setattr(inversion, "MAX_CLASSES", 4)
    skipped = detecting.detect(prepared, options, images=images)
    assert skipped.inversion is None and skipped.as_dict()["evidence"]["trigger_inversion"] is None
    monkeypatch.setattr(inversion, "MAX_CLASSES", 100)
    assert detecting.detect(prepared, options, images=images.reshape(len(images), -1)).inversion is None


def test_patch_area_bounds_the_mask_and_none_leaves_it_free():
    bounded = Patch((1, 8, 8), (0.0, 1.0), seed=0, area=0.03)
    with torch.no_grad():
        bounded.mask_logit.fill_(5.0)  # an unbounded mask would cover everything
    assert float(bounded.mask().detach().mean()) == pytest.approx(0.03, rel=1e-5)
    free = make("patch", (1, 8, 8), (0.0, 1.0))
    with torch.no_grad():
        free.mask_logit.fill_(5.0)
    assert float(free.mask().detach().mean()) > 0.99


def test_robust_z_floor_keeps_coinciding_classes_from_exploding():
    z = robust_z(np.array([-5.0, -5.0, -5.0, -5.0, -4.9]))
    assert abs(z[-1]) < 1.0  # 0.1 apart on margins of 5 is noise, not an outlier
    assert robust_z(np.array([-5.0, -5.1, -4.9, -5.0, 3.0]))[-1] > 10


def test_with_data_the_margin_test_counts_above_its_calibrated_threshold_only(twin_result):
    from otbr_onnx.detect import MARGIN_Z_WITH_DATA
    z = np.zeros(8)
    z[5] = 10.0  # flagged by the data-free threshold 3.5, under the clean-calibrated one
    margin = ScanResult(np.zeros(8), z, 3.5, [5], {}, {}, [], 0)
    assert margin.margin_suspected == [5]
    quiet = combine(margin, {DETECTOR: twin_result})
    assert quiet.suspected == [] and quiet.threshold == MARGIN_Z_WITH_DATA
    z[5] = MARGIN_Z_WITH_DATA + 5
    loud = combine(ScanResult(np.zeros(8), z, 3.5, [5], {}, {}, [], 0), {DETECTOR: twin_result})
    assert loud.suspected == [5] and loud.as_dict()["evidence"]["max_margin"] == [5]


def test_the_html_report_draws_the_recovered_trigger(backdoored_result):
    from otbr_onnx.html_report import inversion_section
    section = inversion_section({"scan": {"inversion": json.loads(json.dumps(backdoored_result.as_dict()))}})
    assert "data:image/svg+xml;base64" in section and f"class {TARGET}: patch mask" in section
    assert inversion_section({"scan": {"inversion": None}}) == ""


def test_the_report_shows_the_users_images_with_the_trigger_applied(backdoored_result, images):
    from otbr_onnx.html_report import triggered_figure
    from otbr_onnx.detectors.inversion import EXAMPLES
    shown = json.loads(json.dumps(backdoored_result.as_dict()))["triggers"][str(TARGET)]
    examples = shown["examples"]
    assert len(examples) == EXAMPLES
    mask = backdoored_result.triggers[TARGET]["mask"]
    for example in examples:
        clean, triggered = np.asarray(example["clean"]), np.asarray(example["triggered"])
        assert clean.shape == triggered.shape == (8, 8) and 0 <= clean.min() and triggered.max() <= 1
        # the clean picture is one of the user's images (range 0..1 already), the triggered one
        # differs from it where the mask is, and the trigger sends it to the target
        assert any(np.allclose(clean, image[0], atol=1e-3) for image in images)
        assert np.abs(triggered - clean)[mask > 0.5].max() > 0.1
        assert np.abs(triggered - clean)[mask < 0.01].max() < 0.05
    assert sum(example["answer"] == TARGET for example in examples) >= EXAMPLES - 1
    figure = triggered_figure(str(TARGET), shown)
    assert "data:image/svg+xml;base64" in figure and f"sent to class {TARGET}" in figure
    assert triggered_figure(str(TARGET), {**shown, "examples": []}) == ""


def test_combine_flags_a_class_either_test_flags(backdoored_result):
    margins = np.zeros(8)
    margin = ScanResult(margins, np.zeros(8), 3.5, [], {}, {}, [], 0)
    both = combine(margin, {DETECTOR: backdoored_result})
    assert both.suspected == [TARGET] and both.margin_suspected == []
    assert not both.cleared(TARGET) and both.evidence == {TARGET: ["trigger_inversion"]}
    alone = combine(margin, {DETECTOR: None})  # registered, not run: the margin test's verdict, threshold kept
    assert alone.suspected == margin.suspected and alone.threshold == margin.threshold and alone.cleared(TARGET)
    found = both.as_dict()
    assert found["evidence"] == {"max_margin": [], "trigger_inversion": [TARGET]}
    json.dumps(found)


def test_scan_with_data_runs_the_inversion_and_the_rescan_runs_the_same_test(tmp_path: Path, images):
    _, model = builders.build_backdoored(TARGET)
    data = tmp_path / "images.npz"
    np.savez(data, x=images)
    options = QUICK.with_(data={"path": str(data)})
    found = scan(model, options)
    report = found.report["scan"]
    assert report["inversion"] is not None and report["inversion"]["images"] == len(images)
    assert set(report["evidence"]) == {"max_margin", "trigger_inversion"}
    result = found.result
    assert set(result.inversion.suspected) <= set(result.suspected)
    # the rescan of an unchanged model runs the identical inversion: same images, same settings
    from otbr_onnx.prepare import prepare
    from otbr_onnx.detect import scan_config
    prepared = prepare(model, options)
    loaded = prepared.loaded
    again = rescan_module(prepared.module, loaded.input_shape, result, loaded.output_index,
                          loaded.output_is_probability, scan_config(options, prepared.device, prepared.chunking))
    assert again.inversion is not None
    for family in result.inversion.families:
        np.testing.assert_allclose(again.inversion.margins[family], result.inversion.margins[family],
                                   rtol=1e-5, atol=1e-5)
    assert again.inversion.suspected == result.inversion.suspected
    # the HTML report shows the inversion's table
    from otbr_onnx.html_report import render
    page = render(json.loads(json.dumps(found.report)))
    assert 'id="inversion"' in page and "Trigger inversion on your images" in page
    # without --data: the data-free scan only, and it says so
    plain = scan(model, QUICK).report["scan"]
    assert plain["inversion"] is None and plain["evidence"]["trigger_inversion"] is None
    assert "give --data" in plain["sees"]


def test_a_class_every_image_is_answered_as_is_not_searched_nor_suspected():
    """Images all answered as class 2 (a model that leans on one class, or unrepresentative
    data): class 2 has no other-class images to send there, so it is neither searched nor
    suspected, and the verdict does not fail (it once raised KeyError)."""
    import torch
    from torch import nn

    from otbr_onnx.detectors.inversion import InversionConfig, invert_module

    class Leaning(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 3)
            with torch.no_grad():
                self.fc.weight.mul_(0.01)
                self.fc.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))

        def forward(self, x):
            return self.fc(x.flatten(1))

    images = np.random.default_rng(0).random((12, 1, 8, 8)).astype(np.float32)
    result = invert_module(Leaning(), images, 3, config=InversionConfig(steps=3))
    assert 2 not in result.suspected
    result.as_dict()
