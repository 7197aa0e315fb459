"""A few of the user's own images with the original's and the cleaned model's answers, for the
report (``examples``) and its HTML page: a reviewer sees at a glance whether cleaning changed what
the model says about ordinary images.

Both models run in onnxruntime as they are written (the cleaned one from its bytes), so the
answers are those a deployment would get. Images are stored small (the largest side at most
``SIDE`` pixels, values 0..255), as pictures, not as inputs: the report stays readable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from converters import runtime
from converters.single_score import as_class_scores
from otbr_onnx.data import read_data
from otbr_onnx.data.images import input_layout
from otbr_onnx.load import load_model

COUNT = 8  # images shown: enough to see a pattern, few enough to read every answer
SIDE = 48  # the largest side of a stored picture (larger images are subsampled)


def answers(original: Path, cleaned: bytes, options, count: int = COUNT) -> dict | None:
    """``count`` of the ``--data`` images, evenly spread over them, with both models' top-1 answers
    and their probabilities; None without ``--data``."""
    if options.data.path is None:
        return None
    interface = options.interface
    loaded = load_model(original, interface.input_shape, interface.output_name, options.limits)
    images = read_data(options, loaded.input_shape)
    picked = np.unique(np.linspace(0, len(images.x) - 1, num=min(count, len(images.x))).round().astype(int))
    x = images.x[picked]
    probabilities = loaded.output_is_probability
    before = _scores(loaded.proto, loaded.output_name, x, probabilities)
    after = _scores(onnx.load_from_string(cleaned), loaded.output_name, x, probabilities)
    pictures = _pictures(x, loaded.input_shape, interface.input_range)
    return {
        "source": images.source,
        "indices": [int(i) for i in picked],
        "images": [
            {"picture": picture, "original": _answer(b), "cleaned": _answer(a)}
            for picture, b, a in zip(pictures, before, after)
        ],
        "changed": int(sum(b.argmax() != a.argmax() for b, a in zip(before, after))),
    }


def _scores(model: onnx.ModelProto, output_name: str, x: np.ndarray, probabilities: bool) -> np.ndarray:
    """Class probabilities of ``model`` on ``x`` (a binary classifier's one column widened to two;
    logits through a softmax, an output that already is probabilities as it is)."""
    session = runtime.session(model)
    raw = runtime.run(session, session.get_inputs()[0].name, output_name, x)
    scores = as_class_scores(raw, model.graph, output_name).astype(np.float64)
    if probabilities:
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _answer(probabilities: np.ndarray) -> dict:
    top = int(probabilities.argmax())
    return {"class": top, "probability": round(float(probabilities[top]), 4)}


def _pictures(x: np.ndarray, input_shape: tuple[int, ...], input_range: tuple[float, float]) -> list:
    """Each image as rows of pixels (grey: one value per pixel; colour: [r, g, b]), 0..255. The
    input range maps to 0..255; a normalised input (``--data-mean``/``--data-std``) is stretched to
    its own minimum and maximum instead, as its range is no longer the pixels'."""
    layout = input_layout(input_shape)
    hwc = np.moveaxis(x, 1, -1) if layout.channels_first else x
    step = max(1, -(-max(hwc.shape[1:3]) // SIDE))
    hwc = hwc[:, ::step, ::step, :]
    low, high = input_range
    if hwc.min() < low or hwc.max() > high:
        low, high = float(hwc.min()), float(hwc.max())
    pixels = np.clip(np.round(255 * (hwc - low) / max(high - low, 1e-12)), 0, 255).astype(int)
    if layout.channels == 1:
        return [image[..., 0].tolist() for image in pixels]
    return [image.tolist() for image in pixels]
