"""``--calibration``: the user's clean, labelled images that the ratio rule scores accuracy on.

``read_calibration`` is the one reader: the CLI's fail-fast check before any work and the ratio
rule's fidelity check (``ratio.reference_set``) both call it, so both refuse a file alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from otbr_onnx.errors import UsageError
from otbr_onnx.evaluate import load_npz, split_sets


def read_calibration(path: str | Path, max_file_bytes: int,
                     input_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (float32) and labels (int64) of the npz at ``path`` (``x``/``y`` or
    ``x_clean``/``y_clean``), each array checked; with ``input_shape`` (the model's, batch
    first), images of another shape are refused. Every refusal is a ``UsageError`` (exit 2)."""
    (x, y), _ = split_sets(load_npz(path, max_file_bytes, "--calibration"), {})
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise UsageError(f"--calibration images have shape {tuple(x.shape[1:])}, the model expects "
                         f"{tuple(input_shape[1:])}")
    return x, y
