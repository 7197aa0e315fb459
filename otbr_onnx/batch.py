"""Batch cleaning: many models into one output folder, in parallel, resumable.

Each model gets ``<name>.onnx`` and ``<name>.report.json`` in the output folder; a model
whose report already records the same input hash, the same options and an output file with
the recorded hash is skipped, so a large registry can be swept in pieces. One failing model
never stops the others; ``summary.json`` lists every outcome.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from otbr_onnx.errors import OtbrError, UsageError, one_line
from otbr_onnx.load import sha256_file
from otbr_onnx.output import atomic_write, write_result


@dataclass(frozen=True)
class Outcome:
    model: str
    status: str  # "cleaned", "skipped" (already done), "refused", "failed"
    exit_code: int
    message: str = ""
    output: str | None = None


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
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"several inputs are named '{duplicates[0]}.onnx'; outputs would collide")
    if not models:
        raise UsageError("no .onnx models found in the given inputs")
    return models


def options_key(options) -> str:
    data = json.dumps(dataclasses.asdict(options), sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def already_done(model: Path, out_dir: Path, key: str) -> bool:
    report_path = out_dir / f"{model.stem}.report.json"
    output = out_dir / f"{model.stem}.onnx"
    if not report_path.is_file() or not output.is_file():
        return False
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    return (report.get("options_key") == key
            and report.get("input", {}).get("sha256") == sha256_file(model)
            and report.get("output", {}).get("sha256") == sha256_file(output))


def clean_one(model: Path, out_dir: Path, options) -> Outcome:
    """Clean one model into ``out_dir``; every failure becomes an Outcome, never an exception."""
    from otbr_onnx.pipeline import clean

    key = options_key(options)
    if already_done(model, out_dir, key):
        return Outcome(str(model), "skipped", 0, "output and report match the input and options",
                       str(out_dir / f"{model.stem}.onnx"))
    output = out_dir / f"{model.stem}.onnx"
    try:
        result = clean(model, options)
        write_result(result, output, out_dir / f"{model.stem}.report.json", {"options_key": key})
        return Outcome(str(model), "cleaned", 0, output=str(output))
    except OtbrError as error:  # one_line: the message quotes the model, and goes to the terminal
        status = "refused" if error.exit_code == 3 else "failed"
        return Outcome(str(model), status, error.exit_code, one_line(error, limit=None))
    except Exception as error:  # noqa: BLE001 - one broken model must not stop the sweep
        return Outcome(str(model), "failed", 1, f"internal error: {type(error).__name__}: {one_line(error)}")


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored while worker processes are spawned.

    A terminal sends SIGINT to every process of the foreground group, so each worker would
    print its own KeyboardInterrupt traceback (a worker still importing has no handler yet). An
    ignored signal stays ignored across exec, and Python keeps it so: the workers never see
    Ctrl-C, and the parent alone stops the batch (``_stop_workers``).
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_signals() -> None:
    """In each worker: ignore Ctrl-C (see above). SIGTERM from the parent keeps its default, a
    silent end: turned into an exception it surfaced as a traceback from wherever it landed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor, futures: list[Future], out_dir: Path) -> None:
    """After Ctrl-C in the parent: drop the queued models, end the running ones, and remove the
    temporary file a worker ended in the middle of ``atomic_write`` may have left."""
    for future in futures:
        future.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    workers = multiprocessing.active_children()  # the pool's processes: public API, unlike pool._processes
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():  # stuck inside a long native call
            worker.kill()
            worker.join()
    for leftover in out_dir.glob(".*.tmp"):  # atomic_write's temporary names: .NAME.XXXX.tmp
        leftover.unlink(missing_ok=True)


def clean_many(models: list[Path], out_dir: Path, options, jobs: int = 1, on_done=None) -> list[Outcome]:
    """Clean every model, ``jobs`` at a time; write ``summary.json``; return the outcomes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    if jobs <= 1:
        for model in models:
            outcomes.append(clean_one(model, out_dir, options))
            if on_done:
                on_done(outcomes[-1])
    else:
        # spawn, not fork: forking after torch started its thread pool can deadlock the child
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_signals) as pool:
            with _sigint_ignored():  # the workers start now and inherit the ignored Ctrl-C
                futures = [pool.submit(clean_one, model, out_dir, options) for model in models]
            try:
                for future in futures:
                    outcomes.append(future.result())
                    if on_done:
                        on_done(outcomes[-1])
            except KeyboardInterrupt:
                _stop_workers(pool, futures, out_dir)
                raise
    summary = {"models": len(outcomes), "outcomes": [dataclasses.asdict(o) for o in outcomes],
               "counts": {s: sum(o.status == s for o in outcomes) for s in ("cleaned", "skipped", "refused", "failed")}}
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return outcomes
