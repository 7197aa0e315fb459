"""Sandboxed reading: the file's bytes (a regular file, capped in size), the protobuf parse, and
external data resolved against the model's own folder and refused when it leaves it. Every
failure while reading is the model's fault: ``loader_errors`` maps what a library raises to a
refusal.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from otbr_onnx.errors import OtbrError, UnreadableModelError, UnsupportedModelError, UsageError, one_line
from otbr_onnx.files import open_regular
from otbr_onnx.load.limits import Limits


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def loader_errors(source: str) -> Iterator[None]:
    """Every failure while reading an untrusted model is the model's fault, never a bug of ours.

    onnx, protobuf and numpy raise their own exception types for hostile files (onnx's
    ValidationError for hard-linked external data, RecursionError for nesting, MemoryError for
    declared sizes); the specific checks below catch what they know, and this maps the rest to a
    refusal (exit 2, or 3 for memory) instead of an internal error (exit 1).
    """
    try:
        yield
    except OtbrError:
        raise
    except MemoryError as error:
        raise UnsupportedModelError(f"{source}: loading the model needs more memory than is available; refused") from error
    except Exception as error:  # noqa: BLE001 - the trust boundary: see the docstring
        raise UnreadableModelError(f"{source}: cannot load: {type(error).__name__}: {one_line(error, 'failed')}") from error


def read_bytes(path: Path, limits: Limits) -> bytes:
    with open_regular(path, "an .onnx file") as handle:  # a FIFO or device is refused, never read
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise UnreadableModelError(f"{path}: file is empty, not an ONNX model")
        if size > limits.max_file_bytes:
            raise UnsupportedModelError(
                f"{path}: file is {size} bytes, above the --max-file-bytes limit of {limits.max_file_bytes}"
            )
        try:
            return handle.read(size)  # no more than the size checked, even if the file grows
        except OSError as error:
            raise UsageError(f"{path}: cannot read: {error.strerror}") from error


def parse(data: bytes, path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as error:
        raise UnreadableModelError(f"{path}: not an ONNX model (protobuf parse failed)") from error
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise UnreadableModelError(f"{path}: not an ONNX model (no graph or IR version)")
    return proto


def inline_external_data(proto: onnx.ModelProto, base_dir: Path, limits: Limits) -> None:
    """Load external tensors, refusing any location that leaves the model's folder.

    The bytes to be read are totalled before reading any: a few tensors each pointing at the
    whole of one large file would otherwise multiply it in memory.
    """
    base = base_dir.resolve()
    total = 0
    for tensor in external_data_helper._get_all_tensors(proto):  # noqa: SLF001 - onnx's own walker
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            with warnings.catch_warnings():  # unknown keys are ignored; a warning would be a 2nd stderr line
                warnings.simplefilter("ignore")
                info = external_data_helper.ExternalDataInfo(tensor)
        except (ValueError, TypeError) as error:  # offset or length that is not an integer
            raise UnreadableModelError(f"tensor '{tensor.name}': malformed external data entry: {error}") from error
        try:
            target = _external_target(tensor.name, info.location, base)
            total += _external_length(tensor.name, info, target)
        except (OSError, ValueError, TypeError, RuntimeError) as error:  # NUL or bad UTF-8, too long, a loop
            raise UnreadableModelError(
                f"tensor '{tensor.name}': unusable external data location {info.location[:80]!r}: {error}"
            ) from error
        if total > limits.max_file_bytes:
            raise UnsupportedModelError(
                f"external data adds up to more than the --max-file-bytes limit of {limits.max_file_bytes} bytes"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            external_data_helper.load_external_data_for_model(proto, str(base))
    except onnx.checker.ValidationError as error:  # onnx's own path checks (hard links, escapes)
        raise UnsupportedModelError(f"onnx refuses the external data: {one_line(error, 'invalid location')}") from error
    except (OSError, ValueError) as error:
        raise UnreadableModelError(f"cannot read external data: {error}") from error


def _external_target(name: str, location: str, base: Path) -> Path:
    """The file ``location`` names, refused unless it is a regular file inside ``base``."""
    if not location:
        raise UnreadableModelError(f"tensor '{name}': external data has no location")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise UnsupportedModelError(f"tensor '{name}': external data location '{location}' is absolute; refused")
    target = (base / location).resolve()  # follows symlinks: a link out of the folder is caught below
    if not target.is_relative_to(base):
        raise UnsupportedModelError(
            f"tensor '{name}': external data location '{location}' leaves the model folder; refused"
        )
    if not target.is_file():  # missing, a folder, or a FIFO that would block the read forever
        raise UnreadableModelError(f"tensor '{name}': external data file '{location}' is missing or not a regular file")
    links = target.stat().st_nlink
    if links > 1:  # another name of the same bytes may live anywhere on the file system
        raise UnsupportedModelError(
            f"tensor '{name}': external data file '{location}' has {links} hard links; refused, since a hard "
            "link can make a file from outside the model folder look local"
        )
    return target


def _external_length(name: str, info: external_data_helper.ExternalDataInfo, target: Path) -> int:
    """How many bytes loading this tensor reads (onnx reads to the end when no length is given)."""
    offset = info.offset or 0
    size = target.stat().st_size
    if offset < 0 or (info.length is not None and info.length < 0) or offset > size:
        raise UnreadableModelError(f"tensor '{name}': external data offset {offset} / length {info.length} is invalid")
    available = size - offset
    return min(info.length, available) if info.length else available
