"""How long each stage took (``Timer``): the pipeline and the removers time their own stages into
one record, which the report shows as ``seconds``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

LOG = logging.getLogger("otbr_onnx")


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 4)
        LOG.info("%s: %.2fs", name, self.seconds[name])
