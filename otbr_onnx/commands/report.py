"""``otbr-onnx report``: a JSON report written earlier, rendered as one HTML page. Runs no model."""

from __future__ import annotations

from pathlib import Path

from otbr_onnx.commands.common import html_target
from otbr_onnx.html_report import page_from_file
from otbr_onnx.output import atomic_write


def report_command(report_file: Path, html_path: Path, max_file_bytes: int) -> int:
    """Render ``report_file`` into ``html_path``; returns the exit code."""
    html_target(html_path, [report_file])
    atomic_write(html_path, page_from_file(report_file, max_file_bytes).encode("utf-8"))
    return 0
