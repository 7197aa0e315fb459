"""Numerical parity between onnxruntime and a PyTorch module on the same random inputs."""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

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

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def providers(name: str) -> list[str]:
    """onnxruntime providers for ``cpu`` or ``cuda`` (the latter needs onnxruntime-gpu)."""
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from otbr_onnx.errors import UsageError

        raise UsageError("--ort-provider cuda needs onnxruntime-gpu (pip install 'otbr-onnx[gpu]') and a GPU")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session(model: onnx.ModelProto, providers: list[str] | None = None) -> ort.InferenceSession:
    """One onnxruntime session; graph optimisations off so it runs the graph as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # errors surface as exceptions; never as extra stderr lines
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"])


def run_ort(sess: ort.InferenceSession, input_name: str, output_name: str, x: np.ndarray) -> np.ndarray:
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    return sess.run([output_name], {input_name: x}, run_options)[0]


def run_torch(module: nn.Module, x: np.ndarray, output_index: int) -> np.ndarray:
    # torch.fx prints its own traceback to stderr when forward fails; the caller reports instead
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
        out = module(torch.from_numpy(x))
    if isinstance(out, (tuple, list)):
        out = out[output_index]
    return out.detach().cpu().numpy()


def random_inputs(shape: tuple[int, ...], count: int, seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(count,) + tuple(shape[1:])).astype(np.float32)


def compare(reference: np.ndarray, other: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> Parity:
    """Max absolute and relative difference of ``other`` against ``reference``."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _compare(reference, other, atol, rtol)


def _compare(reference: np.ndarray, other: np.ndarray, atol: float, rtol: float) -> Parity:
    if reference.shape != other.shape:
        return Parity(float("inf"), float("inf"), float("nan"), 0.0, int(reference.shape[0]))
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    if not np.all(np.isfinite(other)) or not np.all(np.isfinite(reference)):
        max_abs = float("inf")
    return Parity(
        max_abs=max_abs,
        max_rel=max_abs / scale if scale > 0 else max_abs,
        reference_scale=scale,
        tolerance=atol + rtol * scale,
        samples=int(reference.shape[0]),
    )
