"""Errors the tool reports to its user, each tied to a documented exit code.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; anything
else escaping the pipeline is a bug and is reported as an internal error (exit 1).
"""

import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager

# one formatter for both packages (converters cannot import this module, so it lives there);
# here it also escapes what a terminal would act on
from converters.errors import MAX_MESSAGE_CHARS
from converters.errors import one_line as _joined

# Characters a terminal may act on rather than show: C0/C1 controls (ESC starts colour, title
# and screen-clear sequences; BEL ends OSC), format characters (bidi overrides that reorder
# what is shown), line/paragraph separators, surrogates, private-use and unassigned code points.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: str, keep: str = "") -> str:
    """``text`` with every unprintable character written as a visible escape (``\\x1b``, ``\\u202e``).

    Applied to every string that may come from a model, an npz or a file name before it is
    printed or logged; ``keep`` lists characters left as they are (e.g. newlines of our own).
    """
    if text.isprintable():  # the common case: nothing to escape (False for any Cc, Cf, Z* but space)
        return text
    return "".join(c if c in keep or unicodedata.category(c) not in _UNPRINTABLE else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(error: BaseException, fallback: str = "", limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """The error's text on one line (library messages often span several), capped at ``limit``,
    with unprintable characters escaped (messages quote names and paths from untrusted files)."""
    text = printable(_joined(error, fallback, limit=None))
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


# scan's verdict as an exit code, for gates: 0 nothing found, this when a human must look.
EXIT_SUSPECTED = 6
# The exit codes with which ``clean`` has written its output: 0, or EXIT_SUSPECTED when a fresh scan
# of the written model still flags a class (the file is there; a human must look before deploying).
WRITTEN_CODES = (0, EXIT_SUSPECTED)

INTERRUPTED = "otbr-onnx: error: interrupted (Ctrl-C); no partial output was written"
_interrupted = False


def _on_sigint(_signum: int, _frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def watch_interrupts() -> None:
    """Record Ctrl-C as well as raising KeyboardInterrupt (Python's own behaviour otherwise).

    A KeyboardInterrupt raised while a C extension initialises reaches us as an ImportError
    ("initialization failed"), seen 2 times in 33 interrupted runs; with the record the CLI
    still answers "interrupted", exit 130. A Ctrl-C that the shell made ignored stays ignored.
    """
    import signal

    global _interrupted
    _interrupted = False
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _on_sigint):
        signal.signal(signal.SIGINT, _on_sigint)


def was_interrupted() -> bool:
    return _interrupted


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C while slow imports run (torch, onnx: seconds of C extension initialisation);
    a Ctrl-C meanwhile is delivered, as a plain KeyboardInterrupt, when the block ends.

    Interrupted inside an extension's initialisation, libraries print their own tracebacks or
    turn the KeyboardInterrupt into an ImportError (seen in 1 of ~40 runs); blocking the signal
    (not ignoring it) keeps it pending instead of losing it. Threads started meanwhile inherit
    the mask, so the signal still reaches the main thread.
    """
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to hold
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_interrupted() -> None:
    """Ctrl-C, from any point of a run: one line on stderr, exit 130, no traceback."""
    import signal
    import sys

    global _exiting_interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting must not print a traceback
    sys.stderr.write(INTERRUPTED + "\n")
    sys.stderr.flush()
    _exiting_interrupted = True
    sys.exit(130)


_exiting_interrupted = False
_hook_registered = False


def register_exit_hook() -> None:
    """Register ``finish_interrupted`` once; call it before multiprocessing is imported, so that
    the hook runs after multiprocessing's own exit handler (atexit runs the last registered first)."""
    global _hook_registered
    if not _hook_registered:
        import atexit

        atexit.register(finish_interrupted)
        _hook_registered = True


def finish_interrupted() -> None:
    """An ``atexit`` hook, registered before anything else so that it runs last: after Ctrl-C,
    end the process with 130 once every other exit handler (multiprocessing's semaphore cleanup
    among them) has run.

    Without it CPython, when a KeyboardInterrupt was raised inside code a C extension runs during
    import (pybind11 exec), keeps an "unhandled KeyboardInterrupt" flag although we handled it,
    and after shutdown kills itself with SIGINT (status -2, seen 2 times in 44 runs).
    """
    if _exiting_interrupted:
        import os
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)


class OtbrError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1

    def __str__(self) -> str:
        # messages quote names, paths and texts from untrusted files: never hand out raw escapes
        return printable(super().__str__(), keep="\n\t")


class UsageError(OtbrError):
    """Bad options or an unusable path (exit 2)."""

    exit_code = 2


class UnreadableModelError(OtbrError):
    """The file is not a valid ONNX model (exit 2)."""

    exit_code = 2


class UnsupportedModelError(OtbrError):
    """A valid ONNX model that this tool refuses to clean (exit 3)."""

    exit_code = 3


class FidelityBudgetError(UnsupportedModelError):
    """Even the gentlest cleaning changes the model beyond the user's budget: refused (exit 3)."""


class ParityError(OtbrError):
    """onnxruntime and PyTorch disagree beyond tolerance (exit 4)."""

    exit_code = 4
