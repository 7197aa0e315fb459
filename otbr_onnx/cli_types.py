"""The command line's value types: each value is checked when click parses it, so a bad one is a
usage error (exit 2) before any work, and a path that is no regular file is refused unopened."""

from __future__ import annotations

from pathlib import Path

import click

from otbr_onnx.errors import UsageError
from otbr_onnx.files import regular_file_size


class Shape(click.ParamType):
    """A full input shape such as ``1,3,224,224`` (or ``1x3x224x224``), checked when parsed."""

    name = "SHAPE"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(v) for v in str(value).replace("x", ",").split(","))
        except ValueError:
            self.fail(f"expected comma-separated integers such as 1,3,32,32, got {value!r}", param, ctx)
        if any(v <= 0 for v in values):
            self.fail(f"dimensions must be positive, got {value!r}", param, ctx)
        return values


class Range(click.ParamType):
    """An input value range ``LOW,HIGH`` with LOW < HIGH, checked when parsed."""

    name = "LOW,HIGH"

    def convert(self, value, param, ctx) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        try:
            low, high = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected LOW,HIGH such as 0,1 or -1,1, got {value!r}", param, ctx)
        if not low < high:
            self.fail(f"LOW must be below HIGH, got {value!r}", param, ctx)
        return low, high


class Size(click.ParamType):
    """A memory size: bytes, or with a K/M/G/T suffix (binary: 2G is 2 GiB)."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        from otbr_onnx.sizing import parse_size

        try:
            return parse_size(str(value))
        except ValueError:
            self.fail(f"expected a size such as 2G, 512M or 1500000000, got {value!r}", param, ctx)


class Floats(click.ParamType):
    """One or more comma-separated numbers, e.g. ``0.485,0.456,0.406``."""

    name = "X[,X...]"

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected comma-separated numbers such as 0.5 or 0.485,0.456,0.406, got {value!r}", param, ctx)


class DataPath(click.ParamType):
    """``--data``: a folder or a regular file (``os.stat`` only: a FIFO or device is refused unopened)."""

    name = "FOLDER|NPZ"

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path):
            return value
        from otbr_onnx.files import folder_or_file

        try:
            folder_or_file(Path(value), "--data")
        except UsageError as error:
            self.fail(str(error), param, ctx)
        return Path(value)


SHAPE, RANGE, SIZE, FLOATS = Shape(), Range(), Size(), Floats()


class RegularFile(click.Path):
    """An existing regular file: a FIFO would block the first read forever, a device stream forever."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx) -> Path:
        path = super().convert(value, param, ctx)
        try:
            regular_file_size(path)  # os.stat only: nothing is opened
        except UsageError as error:
            self.fail(str(error), param, ctx)
        return path
