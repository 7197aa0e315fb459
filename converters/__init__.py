"""The ONNX <-> PyTorch bridge: conversion (``to_torch``), extra op converters (``ops``),
writing weights back into the original graph (``write_back``) and numerical parity (``parity``)."""
