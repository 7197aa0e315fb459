"""Batch mode: many models, one outcome each, resumable; the same whichever executor runs them.

``clean``: each model gets ``<name>.onnx`` and ``<name>.report.json`` in the output folder; a
model whose report already records the same input hash, the same options and an output file with
the recorded hash is skipped, so a large registry can be swept in pieces. ``scan`` with an output
folder: each model gets ``<name>.report.json``, skipped likewise when its input and options are
unchanged. One failing model never stops the others; ``summary.json`` lists every outcome, in the
order of the inputs, and the exit code is the worst model's.

Where the models run (this process, a local process pool, Ray) is the ``executors`` module's
job; this module is the rest, shared by all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from otbr_onnx.data import contents_sha256
from otbr_onnx.errors import EXIT_SUSPECTED, OtbrError, UsageError, one_line
from otbr_onnx.executors import Executor, ProcessExecutor, SerialExecutor, Task
from otbr_onnx.load import sha256_file
from otbr_onnx.outcome import Outcome
from otbr_onnx.output import atomic_write, check_batch_paths, check_scan_paths, write_result
from otbr_onnx.report import batch_facts

CLEAN_STATUSES = ("cleaned", "skipped", "refused", "failed")
SCAN_STATUSES = ("passed", "suspected", "skipped", "refused", "failed")
SKIPPED = "output and report match the input and options"


def collect_models(inputs: list[Path]) -> list[Path]:
    """Expand folders to the ``.onnx`` files directly inside them; keep files as given."""
    models: list[Path] = []
    for item in inputs:
        if item.is_dir():
            models.extend(sorted(p for p in item.iterdir() if p.suffix == ".onnx" and p.is_file()))
        elif item.exists():
            models.append(item)
        else:
            raise UsageError(f"{item}: no such file or folder")
    names = [m.stem for m in models]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise UsageError(f"several inputs are named '{duplicates[0]}.onnx'; outputs would collide")
    if not models:
        raise UsageError("no .onnx models found in the given inputs")
    return models


def is_batch(models: list[Path], out_dir: Path | None = None) -> bool:
    """Batch mode: several models, a folder, or (``scan``) an output folder for the reports."""
    return len(models) > 1 or _is_dir(models[0]) or out_dir is not None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the file system is not a folder
        return False


def refuse_batch_html(html_path: Path | None) -> None:
    """--html renders one report; a batch has one per model, rendered by ``otbr-onnx report``."""
    if html_path is not None:
        raise UsageError("--html takes one model; render a batch model's NAME.report.json with "
                         "`otbr-onnx report NAME.report.json -o NAME.html`")


def refuse_single_ray(executor: str, batch_is: str) -> None:
    """``--executor ray`` runs a batch's models as tasks; ``batch_is`` says what makes a batch."""
    if executor == "ray":
        raise UsageError(f"--executor ray is for batch mode: {batch_is}")


def check_scan_batch(report_path: Path | None, html_path: Path | None, sarif: bool, out_dir: Path | None) -> None:
    """A batch scan writes one report per model into ``out_dir``, and SARIF is built from them."""
    if report_path is not None:
        raise UsageError("--report names one model's report; in batch mode use --out-dir")
    refuse_batch_html(html_path)
    if sarif and out_dir is None:
        raise UsageError("SARIF in batch scan is built from each model's report: give --out-dir")


def clean_batch_models(inputs: list[Path], out_dir: Path, force: bool) -> list[Path]:
    """The models a batch clean of ``inputs`` runs, once the output folder is checked usable."""
    models = collect_models(inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: batch mode needs an output folder, and this is a file")
    check_batch_paths(inputs, models, out_dir, force)
    return models


def scan_batch_models(inputs: list[Path], out_dir: Path | None) -> list[Path]:
    """The models a batch scan of ``inputs`` runs, once the report folder is checked usable."""
    models = collect_models(inputs)
    if out_dir is not None:
        check_scan_paths(models, out_dir)
    return models


# The options (fields of ``CleanOptions.data``) that name a file of images: the key holds the
# file's contents, not its path
DATA_FILE_OPTIONS = {"path": "--data", "calibration": "--calibration"}


def options_key(options, command: str = "clean") -> str:
    """What a rerun must match to skip a model: the options (and, for a scan, that it was one),
    with the contents of the ``--data`` and ``--calibration`` files in place of their paths, so
    new images written over the old ones are never skipped as done. Without such files the key
    hashes the options as they are. The options' JSON is nested by group since the groups came
    (``CleanOptions.scan`` ...), so a report written before them never matches: a folder an
    earlier version swept is redone once."""
    fields = dataclasses.asdict(options)
    data = fields["data"]
    for name, option in DATA_FILE_OPTIONS.items():
        if data[name] is not None:
            data[name] = {"sha256": contents_sha256(data[name], option)}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256((text if command == "clean" else f"{command}:{text}").encode()).hexdigest()


def finished_report(model: Path, out_dir: Path, key: str, output: Path | None = None) -> dict | None:
    """The report an earlier run left for ``model`` in ``out_dir`` if it still holds: same
    options key, same input hash and (when the run writes one) an output with the recorded hash."""
    report_path = out_dir / f"{model.stem}.report.json"
    if not report_path.is_file() or (output is not None and not output.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("options_key") != key:
        return None
    if report.get("input", {}).get("sha256") != sha256_file(model):
        return None
    if output is not None and report.get("output", {}).get("sha256") != sha256_file(output):
        return None
    try:
        batch_facts(report)
    except (KeyError, TypeError, AttributeError, StopIteration):  # edited by hand: redo the model
        return None
    return report


def final_scan_code(report: dict) -> int:
    """A clean report's exit code: 6 when the scan of the model it handed back flags a class."""
    return EXIT_SUSPECTED if (report.get("final_scan") or {}).get("suspected_targets") else 0


def clean_one(model: Path, out_dir: Path, options) -> Outcome:
    """Clean one model into ``out_dir``; every failure becomes an Outcome, never an exception."""
    from otbr_onnx.pipeline import clean

    start = time.perf_counter()
    output = out_dir / f"{model.stem}.onnx"
    try:
        key = options_key(options)  # reads the data files: a failure is this model's outcome
        earlier = finished_report(model, out_dir, key, output)
        if earlier is not None:
            return _outcome(model, "skipped", final_scan_code(earlier), earlier, start, SKIPPED, output)
        result = clean(model, options)
        report = write_result(result, output, out_dir / f"{model.stem}.report.json", {"options_key": key})
        # written, but a scan of it flags a class: 6, as `scan` of that file would exit
        return _outcome(model, "cleaned", final_scan_code(report), report, start, output=output)
    except Exception as error:  # noqa: BLE001 - one broken model must not stop the sweep
        return _failure(model, error, start)


def scan_one(model: Path, out_dir: Path | None, options) -> Outcome:
    """Scan one model; with ``out_dir``, write its report there (and skip it when done before)."""
    from otbr_onnx.pipeline import scan

    start = time.perf_counter()
    try:
        key = options_key(options, "scan")  # reads the data files: a failure is this model's outcome
        earlier = finished_report(model, out_dir, key) if out_dir is not None else None
        if earlier is not None:
            code = EXIT_SUSPECTED if batch_facts(earlier)["targets"] else 0  # a rerun gives the same answer
            return _outcome(model, "skipped", code, earlier, start, "report matches the input and options")
        found = scan(model, options)
        report = {**found.report, "options_key": key}
        if out_dir is not None:
            atomic_write(out_dir / f"{model.stem}.report.json", json.dumps(report, indent=2).encode())
        if found.backdoor_suspected:
            return _outcome(model, "suspected", EXIT_SUSPECTED, report, start)
        return _outcome(model, "passed", 0, report, start)
    except Exception as error:  # noqa: BLE001 - one broken model must not stop the sweep
        return _failure(model, error, start)


def _outcome(model: Path, status: str, code: int, report: dict, start: float, message: str = "",
             output: Path | None = None) -> Outcome:
    return Outcome(str(model), status, code, message, str(output) if output is not None else None,
                   round(time.perf_counter() - start, 3), **batch_facts(report))



def _failure(model: Path, error: Exception, start: float) -> Outcome:
    """The Outcome of a model whose task raised."""
    seconds = round(time.perf_counter() - start, 3)
    if isinstance(error, OtbrError):  # one_line: the message quotes the model, and goes to the terminal
        status = "refused" if error.exit_code == 3 else "failed"
        return Outcome(str(model), status, error.exit_code, one_line(error, limit=None), seconds=seconds)
    return Outcome(str(model), "failed", 1, f"internal error: {type(error).__name__}: {one_line(error)}",
                   seconds=seconds)


def run_many(task: Task, models: list[Path], out_dir: Path | None, options, statuses: tuple[str, ...],
             executor: Executor | None = None, on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``task`` on every model with ``executor`` (default: one after another, here), calling
    ``on_done`` as each finishes; then write ``summary.json`` (with an ``out_dir``) and return the
    outcomes in the order of ``models``.

    Interrupted (Ctrl-C), the executor has stopped every task before the interrupt reaches here;
    the temporary files of writes it cut short are removed, and no summary is written (nor the
    output folder left behind, if this run created it and nothing was finished in it).
    """
    created = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    try:
        with closing((executor or SerialExecutor()).map(task, models, out_dir, options)) as finished:
            for outcome in finished:
                outcomes.append(outcome)
                if on_done:
                    on_done(outcome)
    except BaseException:
        if out_dir is not None:
            for leftover in out_dir.glob(".*.tmp"):  # atomic_write's temporary names: .NAME.XXXX.tmp
                leftover.unlink(missing_ok=True)
            if created and not any(out_dir.iterdir()):  # e.g. the cluster was unreachable: leave no trace
                out_dir.rmdir()
        raise
    order = {str(model): i for i, model in enumerate(models)}
    outcomes.sort(key=lambda outcome: order[outcome.model])
    if out_dir is not None:
        atomic_write(out_dir / "summary.json", json.dumps(summary(outcomes, statuses), indent=2).encode())
    return outcomes


def summary(outcomes: list[Outcome], statuses: tuple[str, ...]) -> dict:
    """``summary.json``: every outcome, the count per status, and the exit code of the batch."""
    return {"models": len(outcomes), "outcomes": [dataclasses.asdict(o) for o in outcomes],
            "counts": {s: sum(o.status == s for o in outcomes) for s in statuses},
            "exit_code": worst_exit_code(outcomes)}


def worst_exit_code(outcomes: list[Outcome]) -> int:
    """The batch's exit code: the largest of its models'. For a scan that is 6 when any model is
    suspected (6 is above every error code), else the worst error, else 0."""
    return max((o.exit_code for o in outcomes), default=0)


def clean_many(models: list[Path], out_dir: Path, options, jobs: int = 1, on_done=None,
               executor: Executor | None = None) -> list[Outcome]:
    """Clean every model into ``out_dir`` (``jobs`` local processes, or ``executor``)."""
    executor = executor or (ProcessExecutor(jobs) if jobs > 1 else SerialExecutor())
    return run_many(clean_one, models, out_dir, options, CLEAN_STATUSES, executor, on_done)


def scan_many(models: list[Path], out_dir: Path | None, options, jobs: int = 1, on_done=None,
              executor: Executor | None = None) -> list[Outcome]:
    """Scan every model; with ``out_dir``, write each report and ``summary.json`` there."""
    executor = executor or (ProcessExecutor(jobs) if jobs > 1 else SerialExecutor())
    return run_many(scan_one, models, out_dir, options, SCAN_STATUSES, executor, on_done)
