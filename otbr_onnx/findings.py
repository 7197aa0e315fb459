"""The SARIF log of one ``scan`` or ``clean`` run: on stdout (``--format sarif``) and/or in a file
(``--sarif``), written once, before the command exits, whatever the exit code.

``sarif.py`` turns reports into SARIF; this module decides what one run logs: the results of its
report, of a failure (``failed``), or of a batch (``batch_findings``: each model's report file
written in the output folder, or its outcome where it has none).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from otbr_onnx.errors import OtbrError, was_interrupted
from otbr_onnx.outcome import Outcome


class Findings:
    """The SARIF log of one run. ``arguments``: the command line as given (the log's invocation);
    ``echo`` prints the log on stdout when ``to_stdout``."""

    def __init__(self, to_stdout: bool, path: Path | None, inputs: list[Path], arguments: list[str],
                 echo: Callable[[str], None]) -> None:
        self.to_stdout, self.path, self.done = to_stdout, path, False
        self.arguments, self.echo = list(arguments), echo
        if path is not None:  # before any work: the log's path is usable
            from otbr_onnx.output import check_output_path

            check_output_path(path, inputs, False)

    def emit(self, results: list[dict], exit_code: int, error: str | None = None) -> None:
        if self.done or not (self.to_stdout or self.path):
            return
        self.done = True
        from otbr_onnx.output import atomic_write
        from otbr_onnx.sarif import log

        text = json.dumps(log(results, self.arguments, exit_code, error), indent=2)  # \uXXXX for control chars
        if self.path is not None:
            atomic_write(self.path, text.encode())
        if self.to_stdout:
            self.echo(text)

    @contextmanager
    def recording(self, model: Path | None) -> Iterator[None]:
        """Inside: a failure is logged (``failed``) before it propagates to its exit code."""
        try:
            yield
        except Exception as error:
            self.failed(model, error)
            raise

    def failed(self, model: Path | None, error: Exception) -> None:
        """The log of a run that ended in ``error``: a result at ``model`` (when known), and for
        an error that stopped the check itself, a tool notification. Not after Ctrl-C (130)."""
        from otbr_onnx.sarif import UNSUCCESSFUL_EXITS, error_result

        if was_interrupted():  # a library turned Ctrl-C into another error: no verdict to log
            return
        code = error.exit_code if isinstance(error, OtbrError) else 1
        message = " ".join(str(error).split())  # raw: SARIF carries names from the model as data
        if not isinstance(error, OtbrError):
            message = f"internal error: {type(error).__name__}: {message}"
        results = [error_result(model, f"{model}: {message}", code)] if model is not None else []
        self.emit(results, code, message if code in UNSUCCESSFUL_EXITS else None)


def batch_findings(outcomes: list[Outcome], out_dir: Path) -> list[dict]:
    """SARIF results of a batch: each model's written report where it has one."""
    from otbr_onnx.sarif import batch_results

    reports = {}
    for outcome in outcomes:
        path = out_dir / f"{Path(outcome.model).stem}.report.json"
        if outcome.status not in ("refused", "failed") and path.is_file():  # scan: suspected is 6
            try:
                reports[outcome.model] = json.loads(path.read_text())
            except (OSError, ValueError):  # a report replaced since: the outcome alone is still a finding
                pass
    return batch_results([dataclasses.asdict(o) for o in outcomes], reports)
