"""``python -m otbr_onnx`` runs the CLI; ``run`` is also the ``otbr-onnx`` console script."""

import os
import sys

from otbr_onnx.errors import exit_interrupted


def run() -> None:
    """The CLI, with Ctrl-C during its imports (a second or more: torch, onnx) answered as
    everywhere else: one line, exit 130. click's "Aborted!" (exit 1) never shows."""
    try:
        try:
            from otbr_onnx.cli import main

            main()
        except KeyboardInterrupt:
            exit_interrupted()
    except SystemExit as done:
        if done.code != 130:
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
