"""What ``scan`` and ``clean`` share once parsed: their outputs (``Outputs``), where a batch runs
(``Where``), the SARIF log and the checks made before any work.

The command line hands its arguments over by name (click's parameter names); ``take`` removes
the ones a command handles itself, and what is left maps onto ``CleanOptions``
(``options.from_command_line``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from otbr_onnx.errors import UsageError


@dataclass(frozen=True)
class Outputs:
    """What a run prints and writes besides its model: ``fmt`` is what stdout gets (text, json
    or sarif); ``report``, ``sarif`` and ``html`` are the files asked for."""

    fmt: str
    report: Path | None
    sarif: Path | None
    html: Path | None
    quiet: bool


@dataclass(frozen=True)
class Where:
    """Where a batch runs its models (``executors.choose_executor``'s arguments)."""

    jobs: int
    executor: str
    address: str | None
    cpus_per_model: float | None
    gpus_per_model: float | None


def take(given: dict, *names: str) -> list:
    """The values of ``names``, removed from ``given``."""
    return [given.pop(name) for name in names]


def take_outputs(given: dict) -> Outputs:
    """--format/--json (reconciled first: a contradiction is refused before anything else),
    --report, --sarif, --html and --quiet."""
    fmt = output_format(*take(given, "output_format", "as_json"))
    return Outputs(fmt, *take(given, "report_path", "sarif_path", "html_path", "quiet"))


def take_where(given: dict) -> Where:
    return Where(*take(given, "jobs", "executor", "address", "cpus_per_model", "gpus_per_model"))


def take_data(given: dict) -> dict:
    """--data, --data-mean, --data-std as ``options.from_command_line`` takes them (the path as a
    string)."""
    data_path, data_mean, data_std = take(given, "data_path", "data_mean", "data_std")
    return {"data_path": None if data_path is None else str(data_path), "data_mean": data_mean, "data_std": data_std}


def output_format(output_format: str | None, as_json: bool) -> str:
    if as_json and output_format not in (None, "json"):
        raise UsageError(f"--json and --format {output_format} contradict each other (--json is --format json)")
    return "json" if as_json else output_format or "text"


def findings(fmt: str, sarif_path: Path | None, inputs: list[Path], arguments: list[str]):
    """The run's SARIF log (``findings.Findings``): on stdout with --format sarif, in --sarif's file."""
    from otbr_onnx.findings import Findings

    return Findings(fmt == "sarif", sarif_path, inputs, arguments, click.echo)


def html_target(html_path: Path | None, inputs: list[Path]) -> None:
    """Before any work: matplotlib is there and the HTML path is writable."""
    if html_path is None:
        return
    from otbr_onnx.html_report import require_matplotlib
    from otbr_onnx.output import check_output_path

    require_matplotlib()
    check_output_path(html_path, inputs, False)


def check_data_paths(options, outputs: list, out_dirs: list) -> None:
    """Before any work: nothing is written over or into the --data file or folder."""
    if options.data.path is None:
        return
    from otbr_onnx.output import check_data_paths as check

    check(Path(options.data.path), [p for p in outputs if p is not None], [d for d in out_dirs if d is not None])
