"""``otbr-onnx scan``: one model (its verdict and margins, the report, the HTML page, the SARIF
log) or a batch, from the command line's arguments."""

from __future__ import annotations

import json
from pathlib import Path

import click

from otbr_onnx.batch import check_scan_batch, is_batch, refuse_single_ray
from otbr_onnx.commands.batch_run import scan_batch
from otbr_onnx.commands.common import (
    Outputs, check_data_paths, findings, html_target, take, take_data, take_outputs, take_where,
)
from otbr_onnx.data import check_data
from otbr_onnx.errors import EXIT_SUSPECTED
from otbr_onnx.executors import choose_executor
from otbr_onnx.options import from_command_line
from otbr_onnx.output import atomic_write, check_output_path
from otbr_onnx.pipeline import scan as run_scan
from otbr_onnx.report import margins_text
from otbr_onnx.sarif import scan_results
from otbr_onnx.terminal import Progress, echo


def scan_command(models: list[Path], given: dict, arguments: list[str]) -> int:
    """Scan ``models`` with the command line's arguments ``given`` (by click's names; consumed)
    and print the result; returns the exit code (6: a backdoor suspected in some model)."""
    out = take_outputs(given)
    where = take_where(given)
    (out_dir,) = take(given, "out_dir")
    data = take_data(given)
    options = from_command_line(False, {}, **given, **data)  # what is left: the options' own
    options.validate()
    check_data_paths(options, [out.report, out.sarif, out.html], [out_dir])
    if is_batch(models, out_dir):
        check_scan_batch(out.report, out.html, out.fmt == "sarif" or out.sarif is not None, out_dir)
        runner = choose_executor(where.jobs, where.executor, where.address, where.cpus_per_model,
                                 where.gpus_per_model)
        log = findings(out.fmt, out.sarif, models, arguments)
        with log.recording(None):
            return scan_batch(models, out_dir, options, runner, out, log)
    refuse_single_ray(where.executor, "a folder, several models, or --out-dir")
    return _scan_one(models[0], options, out, arguments)


def _scan_one(model: Path, options, out: Outputs, arguments: list[str]) -> int:
    if out.report is not None:
        check_output_path(out.report, [model], False)
    html_target(out.html, [model])
    log = findings(out.fmt, out.sarif, [model], arguments)
    with log.recording(model):
        check_data(model, options)
        with Progress(out.quiet) as progress:
            found = run_scan(model, options, progress, command=arguments)
        code = EXIT_SUSPECTED if found.backdoor_suspected else 0
        if out.report is not None:
            atomic_write(out.report, json.dumps(found.report, indent=2).encode())
        if out.html is not None:
            from otbr_onnx.html_report import write_html

            write_html(found.report, out.html)
        log.emit(scan_results(found.report, model), code)  # before the exit code is returned
    if out.fmt == "json":
        click.echo(json.dumps(found.report, indent=2))
    elif out.fmt == "text" and not out.quiet:
        echo(f"{model}: {found.report['verdict']}")
        echo("\n".join(margins_text(found.report["scan"])))
    return code
