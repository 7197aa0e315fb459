"""``otbr_onnx.examples``: a few of the user's images with the original's and the cleaned model's
answers, for the report and the HTML page (``html_report.examples_section``). The models are the
tests' backdoored MLP and its clean twin (the twin stands in for a cleaned model: other weights,
same graph), run in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from otbr_onnx import CleanOptions, DataOptions
from otbr_onnx.examples import COUNT, answers
from otbr_onnx.html_report import examples_section
from tests import builders


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    x = builders.block_images(40, seed=3)[0]
    x[1::3] = builders.stamp_trigger(x[1::3])  # the backdoored original sends these to class 2, the twin not
    np.savez(folder / "mine.npz", x=x)
    original, twin = builders.build_backdoored(2)[1], builders.build_backdoored(None)[1]
    onnx.save(original, folder / "bd.onnx")
    options = CleanOptions(data=DataOptions(path=str(folder / "mine.npz")))
    return answers(folder / "bd.onnx", twin.SerializeToString(), options), x, original, twin


def _top(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return builders.logits(model, x).argmax(1)


def test_the_answers_are_each_models_own_in_onnxruntime(shown):
    examples, x, original, twin = shown
    assert len(examples["images"]) == COUNT and len(examples["indices"]) == COUNT
    picked = x[examples["indices"]]
    assert examples["indices"][0] == 0 and examples["indices"][-1] == len(x) - 1  # spread over the images
    before, after = _top(original, picked), _top(twin, picked)
    assert [e["original"]["class"] for e in examples["images"]] == before.tolist()
    assert [e["cleaned"]["class"] for e in examples["images"]] == after.tolist()
    assert examples["changed"] == int((before != after).sum())
    assert all(0 < e["original"]["probability"] <= 1 for e in examples["images"])


def test_the_pictures_are_the_images_in_0_to_255(shown):
    examples, x, _, _ = shown
    for index, example in zip(examples["indices"], examples["images"]):
        picture = np.asarray(example["picture"])
        assert picture.shape == (8, 8) and picture.min() >= 0 and picture.max() <= 255
        assert np.allclose(picture, np.round(255 * x[index, 0]), atol=1)


def test_without_data_there_is_nothing_to_show(tmp_path):
    assert answers(tmp_path / "any.onnx", b"", CleanOptions()) is None


def test_the_page_marks_the_images_whose_answer_changed(shown):
    examples = json.loads(json.dumps(shown[0]))
    assert 0 < examples["changed"] < COUNT  # both kinds of image are on the page
    section = examples_section({"examples": examples})
    assert "data:image/svg+xml;base64" in section
    assert f"{examples['changed']} answer(s) changed" in section
    marked = section.count('class="suspected"')
    assert marked == examples["changed"]
    assert examples_section({}) == ""
