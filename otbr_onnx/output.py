"""Atomic file output: the target path holds either the complete new file or nothing new."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from otbr_onnx.errors import UsageError


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse before any work if the output cannot or must not be written."""
    try:
        _check_output_path(output, inputs, force)
    except (OSError, RuntimeError) as error:  # name too long, symlink loop (RuntimeError before 3.13)
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{output}: unusable output path: {reason}") from error


def _check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    for source in inputs:
        if output.resolve() == source.resolve() and not force:
            raise UsageError(f"{output}: output path is the input file; pass --force to overwrite it")
    folder = _folder(output)
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file path for the output")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{folder}: output folder is not writable")


def _new_file_mode(path: Path) -> int:
    """The mode the written file should get: that of the file it replaces, else 0o666 - umask.

    mkstemp creates files 0o600; without this, cleaning would quietly make a shared model
    private, or narrow the permissions of a file the user replaced.
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort, as some file systems refuse a folder fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it.

    On any failure (disk full, Ctrl-C) the temporary file is removed and ``path`` is untouched.
    """
    folder = _folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as error:  # the folder vanished or filled up since check_output_path
        raise UsageError(f"{path}: cannot write: {error.strerror or error}") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if hasattr(os, "fchmod"):  # POSIX only
                os.fchmod(handle.fileno(), _new_file_mode(path))
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:  # already gone, or undeletable: the original error is the one to report
            pass
        if isinstance(error, OSError):
            raise UsageError(f"{path}: cannot write: {error.strerror or error}") from error
        raise
    _sync_folder(folder)


def write_result(result, output: Path, report_path: Path | None) -> None:
    """Write a ``CleanResult``: the model to ``output``, its path and sha256 into the report,
    then the report to ``report_path`` (if any), each file atomically and the model first."""
    data = result.to_bytes()
    atomic_write(output, data)
    result.report["output"] = {"path": str(output), "sha256": hashlib.sha256(data).hexdigest()}
    if report_path is not None:
        atomic_write(report_path, json.dumps(result.report, indent=2).encode())
