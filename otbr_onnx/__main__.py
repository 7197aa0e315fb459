"""``python -m otbr_onnx`` runs the CLI; ``run`` is also the ``otbr-onnx`` console script."""

import signal

from otbr_onnx.errors import (
    exit_interrupted,
    interrupts_deferred,
    register_exit_hook,
    was_interrupted,
    watch_interrupts,
)


def run() -> None:
    """The CLI, with Ctrl-C during its imports (a second or more: torch, onnx) answered as
    everywhere else: one line, exit 130. click's "Aborted!" (exit 1) never shows."""
    register_exit_hook()  # first registered, so it runs last
    watch_interrupts()
    try:
        try:
            with interrupts_deferred():
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

if __name__ == "__main__":
    run()
