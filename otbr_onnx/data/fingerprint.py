"""What a batch rerun must match of the user's data files: their contents, never their path.

A report written by an earlier run is reused only when the options it was made with are the
same (``batch.options_key``). For ``--data`` and ``--calibration`` that means the same images:
new images copied over the old file (or into the old folder) are a new run, while the same
images at another path are not.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from otbr_onnx.data.images import MAX_IMAGES, image_files
from otbr_onnx.files import folder_or_file, open_regular


def contents_sha256(path: str | Path, option: str) -> str:
    """The sha256 of what reading ``path`` sees: a file's bytes, or for a ``--data`` folder the
    name and bytes of each image ``load_images`` reads, in its order (other files never count).
    ``option`` names the flag in a refusal (exit 2), as the readers do."""
    path = Path(path)
    if folder_or_file(path, option) == "file":
        return _file_sha256(path)
    files, _ = image_files(path)
    digest = hashlib.sha256()
    for image in files[:MAX_IMAGES]:
        digest.update(f"{image.name}\0{_file_sha256(image)}\0".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    # a batch computes the key once per model: unchanged files are hashed once per process
    info = os.stat(path)
    return _hashed(str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


@lru_cache(maxsize=4096)
def _hashed(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """sha256 of the regular file at ``path``; the stat fields are the cache key only (ctime
    changes on every write, whatever a tool sets the modification time back to)."""
    digest = hashlib.sha256()
    with open_regular(Path(path), "a data file") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
