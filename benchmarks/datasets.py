"""Loaders for image data that is installed on the machine (nothing is downloaded at run time).

Fashion-MNIST comes from Debian's package ``dataset-fashion-mnist``, which ships the original
gzipped IDX files under /usr/share/datasets/fashion-mnist. Only gzip and numpy are used, so the
loader works wherever the files are, with no torchvision dataset machinery.
"""

import gzip
import os
from pathlib import Path

import numpy as np

# Set this to a folder holding the four *-ubyte.gz files to use a copy outside the Debian paths.
FASHION_MNIST_ENV = "OTBR_FASHION_MNIST_DIR"
FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),  # where dataset-fashion-mnist installs them
    Path("/usr/local/share/datasets/fashion-mnist"),
    Path.home() / ".cache" / "fashion-mnist",
)
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes (third byte of the magic number) that Fashion-MNIST uses.
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into an array of its declared shape.

    Layout: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
    dimension, then the data.
    """
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _candidate_dirs() -> list[Path]:
    override = os.environ.get(FASHION_MNIST_ENV)
    return ([Path(override)] if override else []) + list(FASHION_MNIST_DIRS)


def find_fashion_mnist_dir() -> Path:
    """The first candidate folder that holds all four Fashion-MNIST files."""
    names = [f"{p}-{kind}-idx{n}-ubyte.gz" for p in ("train", "t10k") for kind, n in (("images", 3), ("labels", 1))]
    for folder in _candidate_dirs():
        if all((folder / name).is_file() for name in names):
            return folder
    searched = ", ".join(str(d) for d in _candidate_dirs())
    raise FileNotFoundError(
        f"Fashion-MNIST not found (searched: {searched}). Install it with "
        f"`apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_ENV} to a folder holding "
        "the four *-ubyte.gz files."
    )


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as (x, y).

    x is float32 (N, 1, 28, 28) scaled to [0, 1], the range the triggers and the exported models
    expect; y is int64 class ids 0..9.
    """
    if split not in _FASHION_MNIST_PREFIX:
        raise ValueError(f"split must be one of {sorted(_FASHION_MNIST_PREFIX)}, got {split!r}")
    folder = find_fashion_mnist_dir()
    prefix = _FASHION_MNIST_PREFIX[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return x, labels.astype(np.int64)
