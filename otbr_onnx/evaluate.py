"""ACC, ASR, RA and DER of ONNX classifiers on labelled image sets (BackdoorBench conventions).

Used by ``otbr-onnx eval`` and the benchmarks; the cleaning pipeline itself never sees data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from converters import runtime
from otbr_onnx.errors import UsageError


@dataclass(frozen=True)
class Metrics:
    acc: float  # % of clean images classified correctly
    asr: float | None  # % of triggered non-target images classified as the target
    ra: float | None  # % of triggered non-target images classified as their true label
    clean_samples: int
    poisoned_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read an evaluation set; refuses pickled objects (an npz from a stranger can carry code)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: cannot read as .npz ({error})") from error


def split_sets(clean: dict, poisoned: dict | None) -> tuple[tuple, tuple | None]:
    """(x, y) for clean images and, if any, for triggered images with their true labels.

    One file may hold both (``x_clean, y_clean, x_poisoned, y_poisoned``); a separate file
    holds ``x, y`` (or the same long names).
    """
    def pick(data: dict, kind: str) -> tuple | None:
        for xs, ys in ((f"x_{kind}", f"y_{kind}"), ("x", "y")):
            if xs in data and ys in data:
                return data[xs].astype(np.float32), data[ys].astype(np.int64)
        return None

    clean_set = pick(clean, "clean")
    if clean_set is None:
        raise UsageError("--data must hold arrays x_clean/y_clean (or x/y)")
    poisoned_set = pick(poisoned, "poisoned") if poisoned is not None else None
    if poisoned_set is None and poisoned is None and "x_poisoned" in clean:
        poisoned_set = clean["x_poisoned"].astype(np.float32), clean["y_poisoned"].astype(np.int64)
    return clean_set, poisoned_set


def predict(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    sess = runtime.session(model)
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    return np.concatenate([
        sess.run([out], {inp: x[i:i + batch_size]})[0].argmax(axis=1) for i in range(0, len(x), batch_size)
    ])


def evaluate(model: onnx.ModelProto, clean: tuple, poisoned: tuple | None, target: int) -> Metrics:
    x, y = clean
    acc = 100.0 * float(np.mean(predict(model, x) == y))
    if poisoned is None:
        return Metrics(acc, None, None, len(y), 0)
    xp, yp = poisoned
    keep = yp != target  # images already of the target class say nothing about the trigger
    pred = predict(model, xp[keep])
    asr = 100.0 * float(np.mean(pred == target))
    ra = 100.0 * float(np.mean(pred == yp[keep]))
    return Metrics(acc, asr, ra, len(y), int(keep.sum()))


def der(before: Metrics, after: Metrics) -> float | None:
    """Defense effectiveness rating in [0, 1]: ASR removed, minus ACC lost, rescaled."""
    if before.asr is None or after.asr is None:
        return None
    asr_drop = max(0.0, before.asr - after.asr) / 100.0
    acc_drop = max(0.0, before.acc - after.acc) / 100.0
    return (asr_drop - acc_drop + 1.0) / 2.0
