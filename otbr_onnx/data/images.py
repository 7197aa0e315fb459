"""Reading the user's own images (``--data PATH``): untrusted input, refused in one line.

INTERFACE (to be implemented): ``load_images(path, input_shape, input_range, mean, std, limits)``
returns ``Images``; every refusal is a ``UsageError`` (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otbr_onnx.load import Limits


@dataclass
class Images:
    """The user's images in the model's input layout and range."""

    x: np.ndarray  # float32 (N, *input_shape[1:]): the model's layout, size and value range
    y: np.ndarray | None  # int64 (N,) labels where the npz gave them; a folder has none
    source: str  # for reports and messages: "folder PATH (N images)" or "npz PATH (N images)"
    notes: list[str]  # what was converted (resized, grey->RGB, capped at N files), for the report


def load_images(path: str | Path, input_shape: tuple[int, ...], input_range: tuple[float, float],
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                limits: Limits = Limits()) -> Images:
    raise NotImplementedError
