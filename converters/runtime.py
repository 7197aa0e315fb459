"""The one onnxruntime runner: sessions, runs and random inputs, shared by every check that
runs an ONNX model (load's run check, conversion and output parity, eval, verify, the shape
fallback of the channel-tie analysis)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime

from converters.chunking import Chunking
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
    """One output of ``sess`` on ``x``, with onnxruntime's own logging silenced.

    A model whose input declares a fixed batch size runs ``x`` in chunks of exactly that size,
    the last one padded with copies of its last image (whose outputs are dropped): the written
    model of a fixed-batch input is checked as it is, at its own batch size.

    A float16 input (a model converted to float16 end to end) is fed ``x`` rounded to float16,
    and a float16 output is returned as float32, so every caller compares float32 arrays.
    """
    x = x.astype(input_dtype(sess, input_name), copy=False)
    size = fixed_batch(sess, input_name)
    if size is None or size == len(x):
        return _as_float32(run_outputs(sess, [output_name], {input_name: x})[0])
    chunking = Chunking(size, exact=True)
    parts = [run_outputs(sess, [output_name], {input_name: chunking.pad(x[start:stop])})[0][:stop - start]
             for start, stop in chunking.spans(len(x))]
    return _as_float32(np.concatenate(parts))


def input_dtype(sess: onnxruntime.InferenceSession, input_name: str) -> type:
    """numpy's float16 for a ``tensor(float16)`` input, else float32."""
    for value in sess.get_inputs():
        if value.name == input_name and value.type == "tensor(float16)":
            return np.float16
    return np.float32


def _as_float32(values):
    values = np.asarray(values)
    return values.astype(np.float32) if values.dtype == np.float16 else values


def fixed_batch(sess: onnxruntime.InferenceSession, input_name: str) -> int | None:
    """The batch size ``input_name`` of ``sess`` declares, or None when it is dynamic."""
    for value in sess.get_inputs():
        if value.name == input_name and value.shape:
            first = value.shape[0]
            return first if isinstance(first, int) and first > 0 else None
    return None


def run_outputs(sess: onnxruntime.InferenceSession, output_names: list[str], feeds: dict) -> list:
    """Several outputs of ``sess`` for ``feeds``, with onnxruntime's own logging silenced."""
    run_options = onnxruntime.RunOptions()
    run_options.log_severity_level = 4
    return sess.run(output_names, feeds, run_options)


def random_inputs(shape: tuple[int, ...], count: int, seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``count`` images shaped like ``shape[1:]``, uniform in ``[low, high)``, float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(count,) + tuple(shape[1:])).astype(np.float32)
