"""``python -m otbr_onnx`` runs the CLI; ``run`` is also the ``otbr-onnx`` console script."""

from otbr_onnx.errors import exit_interrupted


def run() -> None:
    """The CLI, with Ctrl-C during its imports (a second or more: torch, onnx) answered as
    everywhere else: one line, exit 130. click's "Aborted!" (exit 1) never shows."""
    try:
        from otbr_onnx.cli import main

        main()
    except KeyboardInterrupt:
        exit_interrupted()


if __name__ == "__main__":
    run()
