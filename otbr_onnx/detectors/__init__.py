"""Backdoor detectors beyond the data-free margin scan (``otbr_onnx.detect``)."""
