"""Stage 1: read an untrusted ONNX file, validate it and find the image input and logits output.

Four concerns, one module each, and the stage that runs them in order (``model.load_model``):

- ``reading``: sandboxed reading of the file and its external data;
- ``checks``: structural checks (names, ops, checker and shape inference, sizes, constants, one run);
- ``interface``: finding the image input and the logits output;
- ``fixed_batch``: the batch plan for a model with a fixed batch size.

``limits`` holds the caps (``Limits``) they share. The names below are the stage's public
interface; import them from ``otbr_onnx.load``.
"""

from otbr_onnx.load.checks import (
    FLOAT_TYPES,
    INF_ALLOWED_READERS,
    MAX_PROTO_BYTES,
    SUPPORTED_DOMAINS,
    default_opset,
    ort_errors,
)
from otbr_onnx.load.fixed_batch import batch_plan, declared_batch
from otbr_onnx.load.interface import check_noise_budget
from otbr_onnx.load.limits import MAX_FILE_BYTES, MAX_NODES, MAX_NOISE_ELEMENTS, MAX_TENSOR_ELEMENTS, Limits
from otbr_onnx.load.model import LoadedModel, describe_model, load_model, load_proto
from otbr_onnx.load.reading import sha256_file

__all__ = [
    "FLOAT_TYPES",
    "INF_ALLOWED_READERS",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MAX_NOISE_ELEMENTS",
    "MAX_PROTO_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "SUPPORTED_DOMAINS",
    "Limits",
    "LoadedModel",
    "batch_plan",
    "check_noise_budget",
    "declared_batch",
    "default_opset",
    "describe_model",
    "load_model",
    "load_proto",
    "ort_errors",
    "sha256_file",
]
