"""Atomic file output: the target path holds either the complete new file or nothing new."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from otbr_onnx.errors import UsageError
from otbr_onnx.files import check_replaceable


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse before any work if the output cannot or must not be written."""
    try:
        _check_output_path(output, inputs, force)
    except (OSError, RuntimeError) as error:  # name too long, symlink loop (RuntimeError before 3.13)
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{output}: unusable output path: {reason}") from error


def check_batch_paths(given: list[Path], models: list[Path], out_dir: Path, force: bool) -> None:
    """Refuse a batch whose output folder overlaps its inputs unless ``force`` (cleaning in place).

    ``given`` are the folders and files named on the command line, ``models`` the models found.
    Overlap: the output folder is, or is inside, an input folder (or holds one); a model lies in
    the output folder (itself or through a link); or a file the batch writes is a link to a model.
    Without this check ``clean DIR DIR`` silently replaced every input model.
    """
    try:
        overlap = _batch_overlap(given, models, out_dir)
        for model in models:
            for target in _batch_targets(out_dir, model):
                check_replaceable(target)
        check_replaceable(out_dir / "summary.json")
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{out_dir}: unusable output folder: {reason}") from error
    if overlap and not force:
        raise UsageError(f"{out_dir}: output folder overlaps the inputs ({overlap}); cleaning would replace input "
                         "models: choose another folder, or pass --force to clean in place")


def check_scan_paths(models: list[Path], out_dir: Path) -> None:
    """Refuse a batch scan's ``--out-dir`` where a report or ``summary.json`` it writes exists and is
    not a regular file, or is a link to one of the models."""
    targets = [out_dir / f"{model.stem}.report.json" for model in models] + [out_dir / "summary.json"]
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"{out_dir}: --out-dir must be a folder, and this is a file")
        for target in targets:
            check_replaceable(target)
        real = {model.resolve() for model in models}
        linked = next((t for t in targets if t.resolve() in real), None)
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{out_dir}: unusable output folder: {reason}") from error
    if linked is not None:
        raise UsageError(f"{linked} is a link to an input model; writing the report would replace it")


def check_data_paths(data: Path, outputs: list[Path], out_dirs: list[Path]) -> None:
    """Refuse, before any work, a run that would write into the ``--data`` folder or over the
    ``--data`` file: an output file that is the data file or lies inside the data folder, or an
    output folder that is, contains or is inside it. ``--force`` does not lift this: the data is
    an input nobody asked to replace. Paths are compared resolved (links followed) and as given."""
    try:
        real = data.resolve()
        for output in outputs:
            if _same_or_inside(output, data, real):
                raise UsageError(f"{output}: output path is, or is inside, the --data {data}; write it elsewhere")
        for out_dir in out_dirs:
            if _same_or_inside(out_dir, data, real) or _inside(real, out_dir.resolve()):
                raise UsageError(f"{out_dir}: output folder overlaps the --data {data}; choose another folder")
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{data}: unusable --data path: {reason}") from error


def _same_or_inside(path: Path, data: Path, real_data: Path) -> bool:
    return _inside(path.resolve(), real_data) or _inside(path.absolute(), data.absolute())


def _batch_targets(out_dir: Path, model: Path) -> tuple[Path, Path]:
    return out_dir / f"{model.stem}.onnx", out_dir / f"{model.stem}.report.json"


def _inside(child: Path, parent: Path) -> bool:
    return child.is_relative_to(parent)


def _batch_overlap(given: list[Path], models: list[Path], out_dir: Path) -> str | None:
    """Why the output folder overlaps the inputs, or None."""
    out = out_dir.resolve()
    for item in given:
        if item.is_dir() and (_inside(out, item.resolve()) or _inside(item.resolve(), out)):
            return f"{item} and {out_dir} share files"
    for model in models:
        real = model.resolve()
        if _inside(real, out) or _inside(model.absolute(), out.absolute()) or model.parent.resolve() == out:
            return f"{model} is inside {out_dir}"
        if any(target.resolve() == real for target in _batch_targets(out_dir, model)):
            return f"{_batch_targets(out_dir, model)[0]} is a link to the input {model}"
    return None


def _check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    for source in inputs:
        if output.resolve() == source.resolve() and not force:
            raise UsageError(f"{output}: output path is the input file; pass --force to overwrite it")
    folder = _folder(output)
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file path for the output")
    check_replaceable(output)  # a FIFO (or device) there must not be swapped for a file
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
    check_replaceable(path)  # checked again here: the batch writes files no one checked up front
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


def write_result(result, output: Path, report_path: Path | None, extra: dict | None = None) -> dict:
    """Write a ``CleanResult``: the model to ``output``, then its report (``report.as_written``:
    the output's path and sha256, and ``extra``) to ``report_path`` (if any), each file atomically
    and the model first. Returns the report as written; ``result`` is left as it was."""
    from otbr_onnx.report import as_written

    data = result.to_bytes()
    atomic_write(output, data)
    report = as_written(result.report, output, hashlib.sha256(data).hexdigest(), extra)
    if report_path is not None:
        atomic_write(report_path, json.dumps(report, indent=2).encode())
    return report
