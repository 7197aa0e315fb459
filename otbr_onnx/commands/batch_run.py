"""A batch of ``scan`` or ``clean`` on the terminal: a progress bar over the models (stderr, on a
terminal only), one line per model as it finishes, a final table, the counts line, the summary
with --json, and the batch's exit code (the worst model's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from otbr_onnx.commands.common import Outputs
from otbr_onnx.errors import printable
from otbr_onnx.terminal import echo


def clean_batch(inputs: list[Path], out_dir: Path, options, executor, out: Outputs, force: bool, findings) -> int:
    from otbr_onnx.batch import CLEAN_STATUSES, clean_batch_models, clean_many
    from otbr_onnx.batch_view import CLEAN_COLUMNS

    models = clean_batch_models(inputs, out_dir, force)
    outcomes = run_batch(clean_many, models, out_dir, options, executor, out.quiet, True, CLEAN_COLUMNS)
    return batch_end(outcomes, out_dir, CLEAN_STATUSES, out, findings, to_stderr=True)


def scan_batch(inputs: list[Path], out_dir: Path | None, options, executor, out: Outputs, findings) -> int:
    from otbr_onnx.batch import SCAN_STATUSES, scan_batch_models, scan_many
    from otbr_onnx.batch_view import SCAN_COLUMNS

    models = scan_batch_models(inputs, out_dir)
    outcomes = run_batch(scan_many, models, out_dir, options, executor, out.quiet, out.fmt != "text", SCAN_COLUMNS)
    return batch_end(outcomes, out_dir, SCAN_STATUSES, out, findings, to_stderr=out.fmt != "text")


def run_batch(run, models: list[Path], out_dir: Path | None, options, executor, quiet: bool,
              to_stderr: bool, columns: tuple[str, ...]) -> list:
    """Run a batch with a progress bar over models (stderr, on a terminal only), one line per model
    as it finishes and a final table (on ``to_stderr`` or stdout, terminal or not)."""
    from tqdm import tqdm

    from otbr_onnx.batch_view import outcome_line, outcome_table

    stream = sys.stderr if to_stderr else sys.stdout
    # disable=None: tqdm draws the bar only when stderr is a terminal
    bar = tqdm(total=len(models), desc="models", unit="model", file=sys.stderr, disable=True if quiet else None)

    def done(outcome) -> None:
        bar.update(1)
        if not quiet:  # file names in a batch folder are anyone's choice: printable
            bar.write(printable(outcome_line(outcome)), file=stream)

    try:
        outcomes = run(models, out_dir, options, executor=executor, on_done=done)
    finally:
        bar.close()
    if not quiet:
        echo("\n".join(["", *outcome_table(outcomes, columns)]), err=to_stderr)
    return outcomes


def batch_end(outcomes: list, out_dir: Path | None, statuses: tuple[str, ...], out: Outputs, findings,
              to_stderr: bool) -> int:
    """The SARIF log, the counts line, the summary on stdout with --json; returns the exit code:
    the worst model's."""
    import click

    from otbr_onnx.batch import summary, worst_exit_code
    from otbr_onnx.findings import batch_findings

    worst = worst_exit_code(outcomes)
    if out_dir is not None:  # the findings come from the reports written there
        findings.emit(batch_findings(outcomes, out_dir), worst)
    if out.fmt == "json":  # summary.json's content (scan without --out-dir: what it would hold)
        click.echo(json.dumps(summary(outcomes, statuses), indent=2))
    if not out.quiet:
        counts = ", ".join(f"{sum(o.status == s for o in outcomes)} {s}" for s in statuses)
        where = f"; summary in {out_dir / 'summary.json'}" if out_dir is not None else ""
        echo(f"batch: {counts}{where}", err=to_stderr)
    return worst
