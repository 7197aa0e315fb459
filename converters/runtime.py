"""The one onnxruntime runner: sessions, runs and random inputs, shared by every check that
runs an ONNX model (load's run check, conversion and output parity, eval, verify, the shape
fallback of the channel-tie analysis)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime

from converters.errors import ProviderError


def providers(name: str) -> list[str]:
    """onnxruntime providers for ``cpu`` or ``cuda`` (the latter needs onnxruntime-gpu)."""
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ProviderError("--ort-provider cuda needs onnxruntime-gpu (pip install 'otbr-onnx[gpu]') and a GPU")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session(model: onnx.ModelProto, providers: list[str] | None = None) -> onnxruntime.InferenceSession:
    """One onnxruntime session; graph optimisations off so it runs the graph as written."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # errors surface as exceptions; never as extra stderr lines
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=providers or ["CPUExecutionProvider"])


def run(sess: onnxruntime.InferenceSession, input_name: str, output_name: str, x: np.ndarray) -> np.ndarray:
    """One output of ``sess`` on ``x``, with onnxruntime's own logging silenced."""
    return run_outputs(sess, [output_name], {input_name: x})[0]


def run_outputs(sess: onnxruntime.InferenceSession, output_names: list[str], feeds: dict) -> list:
    """Several outputs of ``sess`` for ``feeds``, with onnxruntime's own logging silenced."""
    run_options = onnxruntime.RunOptions()
    run_options.log_severity_level = 4
    return sess.run(output_names, feeds, run_options)


def random_inputs(shape: tuple[int, ...], count: int, seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``count`` images shaped like ``shape[1:]``, uniform in ``[low, high)``, float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(count,) + tuple(shape[1:])).astype(np.float32)
