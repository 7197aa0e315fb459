"""What a command prints on the terminal, and how a run ends there: escaped text, stage logging,
progress (a bar on a terminal, a line per long stage in a log) and the one-line error contract.

Imports nothing heavy (tqdm only once a bar is drawn): ``otbr-onnx --help`` reads this module.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable

import click

from otbr_onnx.errors import OtbrError, exit_interrupted, one_line, printable, was_interrupted


def echo(text: str, err: bool = False) -> None:
    """click.echo for text that may hold names, paths or messages from untrusted files: every
    control or format character (terminal escape sequences among them) is printed as an escape."""
    click.echo(printable(text, keep="\n"), err=err)


def run_guarded(debug: bool, action: Callable[[], None]) -> None:
    """Run ``action``; turn every failure into one stderr line and an exit code."""
    try:
        with warnings.catch_warnings():
            if not debug:  # library warnings would break the one-line-on-stderr contract
                warnings.simplefilter("ignore")
            action()
    except OtbrError as error:
        if debug:
            traceback.print_exc()
        click.echo(f"otbr-onnx: error: {one_line(error, limit=None)}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        exit_interrupted()
    except BrokenPipeError:
        reader_gone()
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if was_interrupted():  # Ctrl-C that a library turned into another error (ImportError)
            exit_interrupted()
        if debug:
            traceback.print_exc()
        click.echo(f"otbr-onnx: internal error: {type(error).__name__}: {one_line(error)} (rerun with --debug)",
                   err=True)
        sys.exit(1)


def reader_gone() -> None:
    """``otbr-onnx inspect m.onnx | head``: the pipe closed under a print. Exit as a process that
    SIGPIPE killed (141), silently; stdout goes to /dev/null so the interpreter's final flush does
    not raise again. Every file is written atomically, so none is left half-done."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


class PrintableFormatter(logging.Formatter):
    """Log records quote layer names and paths: escape what a terminal would act on."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep="\n")


def setup_logging(verbose: int) -> None:
    """Stage logging on stderr: warnings only, stages (-v) or details (-vv)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("otbr-onnx: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class StageLog:
    """Progress for a log (stderr not a terminal, where tqdm draws nothing): a line for a stage
    once it looks long, and a heartbeat every ``every_s`` while it lasts.

    "Looks long": the time per step so far, times the steps, reaches ``after_s``. A run of
    quick stages (every test, most refusals) prints nothing, so an error stays the one line on
    stderr; a scan that will take minutes says so at its first step instead of staying silent.
    """

    def __init__(self, after_s: float = 5.0, every_s: float = 60.0, clock=None) -> None:
        import time

        self.after_s, self.every_s = after_s, every_s
        self.clock = clock or time.monotonic
        self.started: dict[str, tuple[float, int]] = {}  # stage -> (time, steps done) at its first update
        self.last_line: dict[str, float] = {}

    def line(self, stage: str, done: int, total: int) -> str | None:
        """The line to print for this update, or None."""
        now = self.clock()
        start, first = self.started.setdefault(stage, (now, done))  # timed from the first update on
        if done <= first:
            return None
        elapsed = now - start
        left = elapsed * (total - done) / (done - first)
        last = self.last_line.get(stage)
        due = elapsed + left >= self.after_s if last is None else now - last >= self.every_s
        if not due:
            return None
        self.last_line[stage] = now
        return f"otbr-onnx: {stage}: {done}/{total} steps, about {duration(left)} left"


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


class Progress:
    """A tqdm bar per stage on stderr unless --quiet; tqdm itself (``disable=None``) stays silent
    when stderr is not a terminal, so there ``StageLog`` prints a line for each long stage: a CI
    log of a long run shows where it is. Entered, it gives the pipeline's progress callback (None
    when quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict = {}
        self.log = None if is_terminal(sys.stderr) else StageLog()

    def __enter__(self):
        return None if self.quiet else self.update

    def update(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False, disable=None)
        bar.update(done - bar.n)
        line = self.log.line(stage, done, total) if self.log is not None else None
        if line is not None:
            echo(line, err=True)

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()
