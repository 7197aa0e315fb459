"""``otbr-onnx verify``: is CLEANED the ORIGINAL graph with only weight values changed, how far did
the weights and outputs move, and (--scan) the two models' margins side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from otbr_onnx.commands.common import take, take_data
from otbr_onnx.errors import UsageError
from otbr_onnx.options import from_command_line
from otbr_onnx.terminal import echo
from otbr_onnx.verify import verify_files

EXIT_DIFFERENT = 5  # the graphs differ in something other than weight values


def verify_command(original: Path, cleaned: Path, given: dict) -> int:
    """Compare the two models with the command line's arguments ``given`` (by click's names;
    consumed) and print the result; returns the exit code (5: the graphs differ)."""
    samples, with_scan, as_json = take(given, "samples", "with_scan", "as_json")
    if given["data_path"] is not None and not with_scan:
        raise UsageError("--data is read by the scan: give --scan too")
    data = take_data(given)
    options = from_command_line(False, {}, **given, **data)  # input shape and range, the caps
    options.validate()
    result, scans = verify_files(original, cleaned, options, samples, with_scan)
    if as_json:
        click.echo(json.dumps({**result.as_dict(), **({"scan": scans} if scans else {})}, indent=2))
    elif result.same_graph:
        echo("\n".join(verify_lines(result, samples, scans)))
    if result.same_graph:
        return 0
    if not as_json:
        echo(f"otbr-onnx: graphs differ at {result.first_difference}", err=True)
    return EXIT_DIFFERENT


def verify_lines(result, samples: int, scans: dict | None) -> list[str]:
    """The text view of a verification whose graphs match."""
    lines = [f"same graph: only weight values differ ({len(result.moved)} tensors changed)"]
    lines += [f"  {name}: max abs {moved['max_abs']:.3g}, relative L2 {moved['relative_l2']:.3g}"
              for name, moved in result.moved.items()]
    lines.append(f"outputs on {samples} random inputs: top-1 agreement {100 * result.top1_agreement:.1f}%, "
                 f"max abs logit diff {result.max_abs_logit_diff:.3g}")
    if scans:
        lines += margins_side_by_side(scans["original"], scans["cleaned"])
    return lines


def margins_side_by_side(original: dict, cleaned: dict) -> list[str]:
    lines = [f"scan: original {original['verdict']} {original['suspected_targets'] or ''}; "
             f"cleaned {cleaned['verdict']} {cleaned['suspected_targets'] or ''}",
             "  class   original margin (z)   cleaned margin (z)"]
    for a, b in zip(original["classes"], cleaned["classes"]):
        lines.append(f"  {a['class']:5d}   {a['max_margin']:9.2f} ({a['z']:6.2f})   {b['max_margin']:9.2f} ({b['z']:6.2f})")
    return lines
