"""``otbr-onnx inspect``: a model's interface, weight layers, channel ties, weight storages and what
``clean`` would do, as text or JSON. Changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from otbr_onnx.describe import describe
from otbr_onnx.load import Limits
from otbr_onnx.terminal import echo

BATCH_PATHS = {"made dynamic": "made dynamic in a working copy", "fixed": "every pass at that size"}
SINGLE_SCORES = {"logit": " (one logit: a binary classifier, read as classes [0, z])",
                 "probability": " (one sigmoid probability: a binary classifier, read as classes [1-p, p])"}


def inspect_command(model: Path, input_shape, output_name: str | None, limits: Limits, as_json: bool) -> int:
    """Describe ``model`` and print it; returns the exit code."""
    info = describe(model, input_shape, output_name, limits)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return 0
    for line in inspect_lines(info):  # one at a time: `| head` ends the run at the first it needs
        echo(line)  # producer, path and verdict are free text from the file: echo escapes them
    return 0


def inspect_lines(info: dict) -> list[str]:
    """The text view of ``describe``'s answer."""
    batch = info["input"]["batch"]
    fixed = "" if batch["path"] == "dynamic" else f" (fixed batch {batch['declared']}: {BATCH_PATHS[batch['path']]})"
    output = info["output"]
    kind = SINGLE_SCORES.get(output.get("single_score")) or (" (probabilities)" if output["probabilities"] else "")
    lines = [f"{info['path']}: opset {info['opset']}, {info['nodes']} nodes, producer {info['producer'] or '?'}",
             f"  input  {info['input']['name']} {info['input']['shape']}{fixed}",
             f"  output {output['name']}{kind}"]
    for layer in info["layers"]:
        why = f"  ({layer['pinned_because']})" if layer["pinned_because"] else ""
        lines.append(f"  {layer['op']:7} {layer['neurons']:5d} neurons  {layer['role']:8} group {layer['group']:3d}  "
                     f"{layer['node']}{why}")
    lines += [f"  skipped {skipped['node']}: {skipped['reason']}" for skipped in info["skipped_layers"]]
    lines += [f"  tied group {group}: {', '.join(members)}" for group, members in info["tie_groups"].items()]
    if info.get("storage"):
        lines.append("  weights stored as: " + ", ".join(f"{n} {name}" for name, n in sorted(info["storage"].items())))
    lines.append(f"  verdict: {info['verdict']}")
    return lines
