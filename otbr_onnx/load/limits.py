"""The caps that keep a hostile file from exhausting the machine (``--max-*`` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_FILE_BYTES = 2 * 1024**3
MAX_NODES = 100_000
MAX_NOISE_ELEMENTS = 64 * 1024**2  # float32 elements of one noise batch (256 MiB)
# Elements of any one intermediate tensor that shape inference can size (batch dims as 1): a
# 10 KB model with ConstantOfShape [16000, 16000] on the logits path otherwise allocates 1 GiB
# per run (3.8 GB peak in clean). The largest activation of common classifiers is ~1e6 per
# image (ResNet at 224: 64 x 112 x 112), so 64 Mi elements (256 MiB of float32) is generous.
MAX_TENSOR_ELEMENTS = 64 * 1024**2


@dataclass(frozen=True)
class Limits:
    """Caps that keep a hostile file from exhausting the machine."""

    max_file_bytes: int = MAX_FILE_BYTES  # also bounds what an npz (--data, --calibration) declares
    max_nodes: int = MAX_NODES
    max_noise_elements: int = MAX_NOISE_ELEMENTS
    max_tensor_elements: int = MAX_TENSOR_ELEMENTS
