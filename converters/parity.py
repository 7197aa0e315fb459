"""Numerical parity: how far two runs of the same inputs are apart (onnxruntime against the
converted PyTorch module, or two ONNX models). Running the models is ``runtime`` and
``to_torch.run_torch``; this module only compares what they return."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# A parity gap below atol + rtol * max|reference| is float32 reordering noise, not a bug.
ATOL = 1e-4
RTOL = 1e-3


@dataclass(frozen=True)
class Parity:
    """How far two runs of the same inputs are apart."""

    max_abs: float
    max_rel: float
    reference_scale: float
    tolerance: float
    samples: int
    allowance: float = 0.0  # part of ``tolerance`` allowed for reduced precision (float16, int8)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def compare(reference: np.ndarray, other: np.ndarray, atol: float = ATOL, rtol: float = RTOL,
            allowance: float = 0.0) -> Parity:
    """Max absolute and relative difference of ``other`` against ``reference``; the tolerance is
    ``atol + rtol * max|reference| + allowance``."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _compare(reference, other, atol, rtol, allowance)


def _compare(reference: np.ndarray, other: np.ndarray, atol: float, rtol: float, allowance: float) -> Parity:
    if reference.shape != other.shape:
        return Parity(float("inf"), float("inf"), float("nan"), 0.0, int(reference.shape[0]), allowance)
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    if not np.all(np.isfinite(other)) or not np.all(np.isfinite(reference)):
        max_abs = float("inf")
    return Parity(
        max_abs=max_abs,
        max_rel=max_abs / scale if scale > 0 else max_abs,
        reference_scale=scale,
        tolerance=atol + rtol * scale + allowance,
        samples=int(reference.shape[0]),
        allowance=allowance,
    )
