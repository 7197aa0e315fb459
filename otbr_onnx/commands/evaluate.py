"""``otbr-onnx eval``: ACC, ASR and RA of a model on labelled images (and of the original, with
the DER), as text or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from otbr_onnx.evaluate import evaluate_files
from otbr_onnx.load import Limits
from otbr_onnx.terminal import echo


def eval_command(model: Path, data_path: Path, poisoned_path: Path | None, target: int | None,
                 original_path: Path | None, limits: Limits, as_json: bool) -> int:
    """Evaluate ``model`` (and ``original_path``) and print the metrics; returns the exit code."""
    found = evaluate_files(model, data_path, poisoned_path, target, original_path, limits)
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2))
        return 0
    if found.original is not None:
        echo(f"{original_path}: {metrics_line(found.original)}")
    echo(f"{model}: {metrics_line(found.metrics)}")
    if found.der is not None:
        click.echo(f"DER: {100 * found.der:.2f}")
    return 0


def metrics_line(m) -> str:
    text = f"ACC {m.acc:.2f}% ({m.clean_samples} clean)"
    if m.asr is not None:
        text += f"  ASR {m.asr:.2f}%  RA {m.ra:.2f}% ({m.poisoned_samples} triggered)"
    return text
