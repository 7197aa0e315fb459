"""Atomic file output: the target path holds either the complete new file or nothing new."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from otbr_onnx.errors import UsageError


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse before any work if the output cannot or must not be written."""
    for source in inputs:
        if output.resolve() == source.resolve() and not force:
            raise UsageError(f"{output}: output path is the input file; pass --force to overwrite it")
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file path for the output")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{folder}: output folder is not writable")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it.

    On any failure (disk full, Ctrl-C) the temporary file is removed and ``path`` is untouched.
    """
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise UsageError(f"{path}: cannot write: {error.strerror or error}") from error
        raise
