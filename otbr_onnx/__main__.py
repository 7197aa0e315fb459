"""``python -m otbr_onnx`` runs the CLI."""

from otbr_onnx.cli import main

main()
