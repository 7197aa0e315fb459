"""The minimal-trigger detector (``otbr_onnx.detectors.minimal``) on the tests' tiny BadNets MLP and
its clean twin (8x8 images, a 2x2 checkerboard trigger), and its anomaly-index maths by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from otbr_onnx import CleanOptions
from otbr_onnx.detectors.minimal import DETECTOR, MinimalConfig, anomaly_index, search, verdict
from otbr_onnx.prepare import prepare
from tests import builders

TARGET = 2
QUICK = MinimalConfig(steps=150)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return builders.block_images(200, seed=7)[0]


@pytest.fixture(scope="module")
def backdoored_result(images):
    return search(builders.build_backdoored(TARGET)[0], images, 8, config=QUICK)


@pytest.fixture(scope="module")
def twin_result(images):
    return search(builders.build_backdoored(None)[0], images, 8, config=QUICK)


def test_the_planted_patch_target_gets_the_smallest_mask_and_is_flagged(backdoored_result):
    norms = backdoored_result.norms["patch"]
    assert int(np.argmin(norms)) == TARGET
    assert norms[TARGET] < 0.6 * np.median(np.delete(norms, TARGET))
    assert backdoored_result.reached["patch"][TARGET]
    assert backdoored_result.flipped["patch"][TARGET] >= 0.8
    assert backdoored_result.suspected[:1] == [TARGET]
    assert backdoored_result.evidence[TARGET]
    assert int(np.argmax(backdoored_result.index["patch"])) == TARGET
    assert backdoored_result.anomaly[TARGET] > 1.0
    assert not backdoored_result.cleared(TARGET)
    trigger = backdoored_result.triggers[TARGET]
    assert (trigger["mask"] if trigger["family"] == "patch" else trigger["delta"][0]).shape == (8, 8)


def test_the_clean_twin_is_not_flagged(twin_result):
    assert twin_result.suspected == []
    assert twin_result.cleared(TARGET)
    assert np.all(twin_result.anomaly <= 1.0)


def test_the_same_settings_give_the_same_result(images, backdoored_result):
    again = search(builders.build_backdoored(TARGET)[0], images, 8, config=QUICK)
    for family in QUICK.families:
        np.testing.assert_array_equal(again.norms[family], backdoored_result.norms[family])
    assert again.suspected == backdoored_result.suspected


def test_the_detector_runs_and_reruns_the_same_test(images):
    model, proto = builders.build_backdoored(TARGET)
    prepared = prepare(proto, CleanOptions())
    detector = replace(DETECTOR, config=QUICK)
    found = detector.run(prepared, CleanOptions(), images)
    assert all(hasattr(found, name) for name in ("suspected", "anomaly", "evidence", "cleared", "statistic"))
    assert found.suspected[:1] == [TARGET]
    again = detector.rerun(prepared.module, found, 8, prepared.loaded.output_index,
                           prepared.loaded.output_is_probability)
    np.testing.assert_array_equal(again.norms["patch"], found.norms["patch"])
    assert again.suspected == found.suspected
    report = found.as_dict()
    assert report["suspected_targets"] == found.suspected
    assert report["triggers"][str(TARGET)]["family"] in QUICK.families
    assert detector.run(prepared, CleanOptions(), None) is None


def test_the_anomaly_index_by_hand():
    norms = np.array([10.0, 12.0, 11.0, 9.0, 2.0, 13.0, np.nan])
    # finite: 2 9 10 11 12 13 -> median 10.5; |n - 10.5| = 0.5 1.5 1.5 0.5 8.5 2.5 -> MAD 1.5
    spread = 1.4826 * 1.5
    expected = np.array([0.5, -1.5, -0.5, 1.5, 8.5, -2.5, 0.0]) / spread
    np.testing.assert_allclose(anomaly_index(norms), expected)
    # the floor: nearly equal norms cannot give a large index
    assert anomaly_index(np.array([10.0, 10.0, 10.0, 9.9]), 0.05)[3] == pytest.approx(0.1 / 0.5)
    suspected, index = verdict({"patch": norms[:6], "additive": np.array([5.0, 5.1, 4.9, 5.0, 5.2, 1.0])}, 2.0)
    assert suspected == [5, 4]  # additive: median 5, MAD 0.1 floored at 0.25, index 16 for 5; patch: 3.8 for 4
    assert index["patch"][4] == pytest.approx(8.5 / spread)
    # only classes below the median are flagged
    assert verdict({"patch": np.array([1.0, 1.0, 1.0, 50.0])}, 2.0)[0] == []
