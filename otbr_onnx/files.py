"""Files named on the command line or inside untrusted files: only regular files are read.

A FIFO, a character device or a socket given as a model, ``--data`` or ``--calibration`` would
block the first read forever (a FIFO with no writer) or stream without end (``/dev/zero``).
``os.stat`` tells what a path is without opening it, so such paths are refused before any
open; the open itself is non-blocking and re-checked, so a FIFO swapped in after the stat
cannot block either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from otbr_onnx.errors import UsageError


def regular_file_size(path: Path, expected: str = "a file") -> int:
    """Size in bytes of the regular file at ``path``; ``UsageError`` (exit 2) for anything else."""
    try:
        info = os.stat(path)
    except FileNotFoundError as error:
        raise UsageError(f"{path}: no such file") from error
    except (OSError, ValueError) as error:  # too long, a symlink loop, permission, a NUL in the name
        raise UsageError(f"{path}: cannot read: {getattr(error, 'strerror', None) or error}") from error
    _require_regular(path, info.st_mode, expected)
    return info.st_size


def folder_or_file(path: Path, option: str) -> str:
    """"folder" or "file" for a path that may be either (``--data``); ``UsageError`` (exit 2) for
    anything else. ``os.stat`` only: a FIFO or device is refused without being opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as error:
        raise UsageError(f"{option} {path}: no such file or folder") from error
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path}: cannot read: {getattr(error, 'strerror', None) or error}") from error
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    raise UsageError(f"{option} {path}: is not a folder or a regular file (a FIFO, device or socket); refused")


def open_regular(path: Path, expected: str = "a file") -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file."""
    regular_file_size(path, expected)
    try:
        # O_NONBLOCK: opening a FIFO for reading waits for a writer; this returns at once instead
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise UsageError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        _require_regular(path, os.fstat(fd).st_mode, expected)
    except BaseException:
        os.close(fd)
        raise
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
    return os.fdopen(fd, "rb")


def _require_regular(path: Path, mode: int, expected: str) -> None:
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path}: is a directory, expected {expected}")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: is not a regular file (a FIFO, device or socket), expected {expected}; refused")


def check_replaceable(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file.

    The atomic rename would silently replace a FIFO (or a device node) that something else
    reads from by an ordinary file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # nothing there (or a dangling link, which the rename replaces): fine
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unusable output path: {getattr(error, 'strerror', None) or error}") from error
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path}: is a directory; give a file path for the output")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: output exists and is not a regular file (a FIFO, device or socket); refused")
