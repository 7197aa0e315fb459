"""Images per pass: a batch cut into chunks of at most ``size`` images, the last one padded when
the model takes exactly ``size`` (a fixed batch dimension). Shared by onnxruntime runs
(``runtime.run``) and every PyTorch pass of the cleaning (``otbr_onnx.sizing`` chooses the size)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: onnxruntime runs chunk numpy arrays
    import torch

# Before this change the scan, the probes and every inference ran 256 images per pass; no model
# that fits a budget at 256 sees a different chunking (and so a different floating-point order).
MAX_PASS = 256


@dataclass(frozen=True)
class Chunking:
    """Images per forward pass; ``exact``: the model takes exactly ``size`` (pad the last chunk)."""

    size: int = MAX_PASS
    exact: bool = False

    def spans(self, count: int) -> Iterator[tuple[int, int]]:
        """(start, stop) of each chunk of ``count`` images."""
        for start in range(0, count, self.size):
            yield start, min(start + self.size, count)

    def pad(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """``x`` padded to ``size`` rows with copies of its last row when the model needs exactly
        that many; otherwise ``x`` itself. The caller drops the outputs past ``len(x)``."""
        missing = self.size - len(x) if self.exact else 0
        if missing <= 0:
            return x
        if isinstance(x, np.ndarray):
            return np.concatenate([x, np.repeat(x[-1:], missing, axis=0)])
        import torch

        return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])
