"""The ONNX <-> PyTorch bridge: conversion (``to_torch``), extra op converters (``ops``), writing
weights back into the original graph (``write_back``), the onnxruntime runner (``runtime``),
numerical comparison (``parity``) and the bridge's own errors (``errors``).

It imports nothing from ``otbr_onnx`` (``tests/test_architecture.py`` checks it): ``otbr_onnx``
calls it, and ``otbr_onnx.bridge`` maps its errors onto the tool's own.
"""
