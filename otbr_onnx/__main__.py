"""``python -m otbr_onnx`` runs the CLI; ``run`` is also the ``otbr-onnx`` console script."""

import os
import signal
import sys

from otbr_onnx.errors import exit_interrupted, was_interrupted, watch_interrupts


def run() -> None:
    """The CLI, with Ctrl-C during its imports (a second or more: torch, onnx) answered as
    everywhere else: one line, exit 130. click's "Aborted!" (exit 1) never shows."""
    watch_interrupts()
    try:
        try:
            from otbr_onnx.cli import main

            main()
        except KeyboardInterrupt:
            exit_interrupted()
        except ImportError:
            if was_interrupted():  # Ctrl-C inside a C extension's initialisation
                exit_interrupted()
            raise
    except SystemExit as done:
        if done.code != 130:
            # the run is over and its exit code decided: a Ctrl-C during the interpreter's
            # shutdown would otherwise kill it with SIGINT (status -2, no message)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise
        # After Ctrl-C, leave without the interpreter's shutdown: a KeyboardInterrupt raised
        # inside code that a C extension runs during import (pybind11 exec) leaves CPython's
        # "unhandled KeyboardInterrupt" flag set although we handled it, and at shutdown the
        # interpreter then kills itself with SIGINT (status -2, seen 2 times in 44 runs) instead
        # of exiting 130. Output is flushed and nothing is left half-written at this point.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)


if __name__ == "__main__":
    run()
