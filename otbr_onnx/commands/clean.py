"""``otbr-onnx clean``: one model (written with its report, HTML page and SARIF log, and a summary
on stderr) or a batch into an output folder, from the command line's arguments."""

from __future__ import annotations

import json
from pathlib import Path

import click

from otbr_onnx.batch import final_scan_code, is_batch, refuse_batch_html, refuse_single_ray
from otbr_onnx.commands.batch_run import clean_batch
from otbr_onnx.commands.common import (
    Outputs, check_data_paths, findings, html_target, take, take_data, take_outputs, take_where,
)
from otbr_onnx.data import check_calibration, check_data
from otbr_onnx.executors import choose_executor
from otbr_onnx.options import from_command_line
from otbr_onnx.output import check_output_path, write_result
from otbr_onnx.pipeline import clean as run_clean
from otbr_onnx.report import summary_text
from otbr_onnx.sarif import clean_results
from otbr_onnx.terminal import Progress, echo

# Options whose absence (None) lets --reference's published values stand; every other option
# always has a value, which overrides the base settings.
OVERRIDES = ("iterations", "batch_size", "lr", "fusion_lambda", "prune_ratio")


def clean_command(models: list[Path], output: Path, given: dict, arguments: list[str]) -> int:
    """Clean ``models`` into ``output`` (a file, or the batch's folder) with the command line's
    arguments ``given`` (by click's names; consumed) and print the result; returns the exit code
    (6: a written model that a fresh scan flags)."""
    out = take_outputs(given)
    where = take_where(given)
    reference, force = take(given, "reference", "force")
    overrides = dict(zip(OVERRIDES, take(given, *OVERRIDES)))
    data = take_data(given)
    options = from_command_line(reference, overrides, **given, **data)  # what is left: the options' own
    options.validate()
    batch = is_batch(models)
    if batch:
        check_data_paths(options, [out.sarif], [output])
    else:
        check_data_paths(options, [output, out.report, out.sarif, out.html], [])
    check_calibration(options)  # fail fast, before loading or unlearning: the ratio rule reads it last
    if batch:
        refuse_batch_html(out.html)
        runner = choose_executor(where.jobs, where.executor, where.address, where.cpus_per_model,
                                 where.gpus_per_model)
        log = findings(out.fmt, out.sarif, models, arguments)
        with log.recording(None):
            return clean_batch(models, output, options, runner, out, force, log)
    refuse_single_ray(where.executor, "give a folder or several models")
    return _clean_one(models[0], output, options, out, force, arguments)


def _clean_one(model: Path, output: Path, options, out: Outputs, force: bool, arguments: list[str]) -> int:
    check_output_path(output, [model], force)
    if out.report is not None:
        check_output_path(out.report, [model, output], False)
    html_target(out.html, [model, output])
    log = findings(out.fmt, out.sarif, [model, output], arguments)
    with log.recording(model):  # refused (3), parity failure (4), ...: logged before the exit
        check_data(model, options)
        with Progress(out.quiet) as progress:
            result = run_clean(model, options, progress, command=arguments)
        report = write_result(result, output, out.report, _examples(model, result, options))
        if out.html is not None:
            from otbr_onnx.html_report import write_html

            write_html(report, out.html)
        code = final_scan_code(report)  # 6 as `scan` of the written file; batch mode alike
        log.emit(clean_results(report, model), code)
    if out.fmt == "json":  # json.dumps writes every control character as \\uXXXX
        click.echo(json.dumps(report, indent=2))
    if not out.quiet:
        echo(summary_text(result.report), err=True)
        echo(f"  wrote {output}" + ("" if result.changed else " (the input, unchanged)"), err=True)
    return code


def _examples(model: Path, result, options) -> dict | None:
    """A few of the user's images with both models' answers (``examples.answers``), for the report
    of a model that was changed with --data. Both models already ran in onnxruntime (the parity
    checks), so this adds only their answers on a handful of images."""
    if not result.changed or options.data.path is None:
        return None
    from otbr_onnx.examples import answers

    return {"examples": answers(model, result.to_bytes(), options)}
