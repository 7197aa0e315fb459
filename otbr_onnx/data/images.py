"""Reading the user's own images (``--data PATH``): untrusted input, refused in one line.

``load_images(path, input_shape, input_range, mean, std, limits)`` is the one entry point. It
reads either

* a **folder** of PNG and JPEG files. Only the folder's own entries are looked at (sub-folders
  are ignored, not recursed into); files with another extension are skipped; each image is
  decoded one at a time, converted to the model's channels (grey -> RGB repeats the grey value;
  RGB -> grey is Pillow's ITU-R 601-2 luma; alpha is dropped, a palette is expanded, 16-bit
  values are scaled by 1/65535, an animated PNG gives its first frame), resized to the model's
  H x W with Pillow's bilinear filter (antialiased when shrinking), scaled from [0, 1] to
  ``input_range`` and, where ``mean``/``std`` are given, normalised per channel as
  ``(x - mean) / std``; or
* an **.npz** with ``x`` of shape (N, *input_shape[1:]) already in the model's layout and value
  range, used as given, and optional integer labels ``y`` (N,).

Every refusal is a ``UsageError`` (exit 2) with one line. What bounds the work:

* at most ``MAX_ENTRIES`` folder entries are listed (more: refused, since a subset taken in
  listing order would depend on the file system); of the image files the first ``MAX_IMAGES``
  by name are read, and no more than ``limits.max_noise_elements`` floats are held in all;
* an image's header is read before its pixels: more than ``MAX_PIXELS`` is refused (Pillow's
  own decompression-bomb check is tightened to the same bound), as is a file above
  ``MAX_IMAGE_FILE_BYTES``;
* only PNG and JPEG decoders are ever used, whatever the extension says;
* a link whose target leaves the folder, and any FIFO, device or socket, is refused without
  being opened;
* fewer than ``MIN_IMAGES`` images (from a folder or an npz) are refused: too few to say
  anything about a model's behaviour.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from otbr_onnx.errors import UsageError, one_line
from otbr_onnx.files import folder_or_file, open_regular
from otbr_onnx.load import Limits

MIN_IMAGES = 10
MAX_IMAGES = 2000  # image files read from a folder: the first this many by name
MAX_ENTRIES = 50_000  # folder entries listed before refusing (bounds the time a huge folder takes)
MAX_PIXELS = 4096 * 4096  # one image's decoded size (a 50,000 x 50,000 PNG fits in a few KB)
MAX_IMAGE_FILE_BYTES = 64 * 1024**2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DECODERS = ["PNG", "JPEG"]  # Pillow plugins allowed to read a file, whatever its name claims
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass
class Images:
    """The user's images in the model's input layout and range."""

    x: np.ndarray  # float32 (N, *input_shape[1:]): the model's layout, size and value range
    y: np.ndarray | None  # int64 (N,) labels where the npz gave them; a folder has none
    source: str  # for reports and messages: "folder PATH (N images)" or "npz PATH (N images)"
    notes: list[str] = field(default_factory=list)  # what was converted, for the report

    def as_dict(self) -> dict:
        return {"source": self.source, "images": int(len(self.x)), "labelled": self.y is not None,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class Layout:
    """Where the channels sit in the model's input, and the image size it takes."""

    channels: int
    height: int
    width: int
    channels_first: bool

    def place(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) -> the model's per-image layout."""
        return np.moveaxis(image, -1, 0) if self.channels_first else image


def load_images(path: str | Path, input_shape: tuple[int, ...], input_range: tuple[float, float],
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                limits: Limits = Limits()) -> Images:
    """The images at ``path`` (a folder of PNG/JPEG or an .npz) for a model taking ``input_shape``
    values in ``input_range``; ``UsageError`` with one line for anything unusable."""
    path = Path(path)
    layout = input_layout(input_shape)
    kind = folder_or_file(path, "--data")
    capacity = _capacity(input_shape, limits)
    if kind == "folder":
        normalise = _normaliser(mean, std, layout.channels)
        return _load_folder(path, layout, input_range, normalise, capacity)
    if mean is not None or std is not None:
        raise UsageError(f"--data {path}: --data-mean/--data-std apply to a folder of images; an npz's 'x' "
                         "is used as given (already normalised)")
    return _load_npz(path, input_shape, input_range, capacity, limits)


def input_layout(input_shape: tuple[int, ...]) -> Layout:
    """NCHW when dim 1 is 1 or 3 channels, else NHWC when the last dim is; anything else refused."""
    if len(input_shape) != 4:
        raise UsageError(f"--data needs a model taking images (N, C, H, W) or (N, H, W, C); its input has "
                         f"shape {tuple(input_shape)}")
    _, a, b, c = input_shape
    if a in (1, 3):
        return Layout(a, b, c, True)
    if c in (1, 3):
        return Layout(c, a, b, False)
    raise UsageError(f"--data: the model's input {tuple(input_shape)} has no 1- or 3-channel axis (NCHW or NHWC); "
                     "give an npz whose 'x' is already in the model's layout")


def _capacity(input_shape: tuple[int, ...], limits: Limits) -> int:
    """How many images may be held: ``MAX_IMAGES``, fewer where --max-noise-elements says so."""
    per_image = math.prod(input_shape[1:])
    capacity = min(MAX_IMAGES, limits.max_noise_elements // max(per_image, 1))
    if capacity < MIN_IMAGES:
        raise UsageError(f"--data: {MIN_IMAGES} images of {tuple(input_shape[1:])} exceed the --max-noise-elements "
                         f"limit of {limits.max_noise_elements}; raise it")
    return capacity


# ---------------------------------------------------------------------------------------------
# a folder of PNG / JPEG files
# ---------------------------------------------------------------------------------------------


def _load_folder(folder: Path, layout: Layout, input_range: tuple[float, float], normalise, capacity: int) -> Images:
    files, notes = image_files(folder)
    if len(files) < MIN_IMAGES:
        raise UsageError(f"--data {folder}: {len(files)} PNG/JPEG file(s); at least {MIN_IMAGES} images are needed")
    if len(files) > capacity:
        notes.append(f"read the first {capacity} of {len(files)} image files (sorted by name)")
        files = files[:capacity]
    low, high = input_range
    x = np.empty((len(files), *_per_image_shape(layout)), np.float32)  # filled one image at a time
    conversions: dict[str, int] = {}
    for index, file in enumerate(files):
        pixels, how = read_image(file, layout)
        for note in how:
            conversions[note] = conversions.get(note, 0) + 1
        x[index] = layout.place(normalise(low + (high - low) * pixels))
    notes += [f"{note}: {count} image(s)" for note, count in sorted(conversions.items())]
    return Images(x, None, f"folder {folder} ({len(files)} images)", notes)


def _per_image_shape(layout: Layout) -> tuple[int, int, int]:
    if layout.channels_first:
        return layout.channels, layout.height, layout.width
    return layout.height, layout.width, layout.channels


def image_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The folder's PNG/JPEG files sorted by name, and notes on what was passed over."""
    real_folder = folder.resolve()
    found: list[Path] = []
    passed = {"sub-folder(s) ignored (not recursed into)": 0, "file(s) without a .png/.jpg/.jpeg name skipped": 0}
    for count, entry in enumerate(_entries(folder), start=1):
        if count > MAX_ENTRIES:
            raise UsageError(f"--data {folder}: holds more than {MAX_ENTRIES} entries; give a folder of at most "
                             f"{MAX_ENTRIES} files (the first {MAX_IMAGES} images by name are read) or an npz")
        what = _entry_kind(entry, real_folder)
        if what == "folder":
            passed["sub-folder(s) ignored (not recursed into)"] += 1
        elif not entry.name.lower().endswith(IMAGE_SUFFIXES):
            passed["file(s) without a .png/.jpg/.jpeg name skipped"] += 1
        else:
            found.append(Path(entry.path))
    notes = [f"{count} {what}" for what, count in passed.items() if count]
    return sorted(found, key=lambda p: p.name), notes


def _entries(folder: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as listing:
            yield from listing
    except OSError as error:
        raise UsageError(f"--data {folder}: cannot list the folder: {error.strerror or error}") from error


def _entry_kind(entry: os.DirEntry, real_folder: Path) -> str:
    """"file" or "folder"; a link leaving the folder or a FIFO/device/socket is refused, unopened."""
    try:
        if entry.is_symlink():
            target = Path(entry.path).resolve()
            if real_folder not in target.parents:
                raise UsageError(f"--data: {entry.path} is a link that leaves the data folder; refused")
        mode = entry.stat().st_mode  # follows a link (inside the folder): what it points to
    except FileNotFoundError as error:  # a dangling link, or removed since the listing
        raise UsageError(f"--data: {entry.path}: no such file (a dangling link?)") from error
    except (OSError, RuntimeError) as error:  # permission, a link loop (RuntimeError before 3.13)
        raise UsageError(f"--data: {entry.path}: cannot read: {getattr(error, 'strerror', None) or error}") from error
    if stat.S_ISDIR(mode):
        return "folder"
    if not stat.S_ISREG(mode):
        raise UsageError(f"--data: {entry.path} is not a regular file (a FIFO, device or socket); refused")
    return "file"


def read_image(path: Path, layout: Layout) -> tuple[np.ndarray, list[str]]:
    """One image as float32 (H, W, C) in [0, 1] at the model's size and channels, and what was
    converted on the way."""
    from PIL import Image, UnidentifiedImageError

    with open_regular(path, "an image file") as handle, _bomb_guard():
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_IMAGE_FILE_BYTES:
            raise UsageError(f"--data: {path} is {size} bytes, above the {MAX_IMAGE_FILE_BYTES}-byte limit per image")
        try:
            with Image.open(handle, formats=DECODERS) as image:  # reads the header only
                _check_pixels(path, image.width, image.height)
                return _converted(image, layout)
        except UsageError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            if isinstance(error, UnidentifiedImageError):
                raise UsageError(f"--data: {path} is not a PNG or JPEG image") from error
            raise UsageError(f"--data: {path} declares more than {MAX_PIXELS} pixels (a decompression bomb?); "
                             "refused") from error
        except (OSError, ValueError, SyntaxError, EOFError, zlib.error, MemoryError) as error:
            raise UsageError(f"--data: {path} cannot be decoded ({one_line(error, type(error).__name__)})") from error


@contextmanager
def _bomb_guard() -> Iterator[None]:
    """Pillow's decompression-bomb limit tightened to ``MAX_PIXELS`` (its warning, issued from
    MAX_IMAGE_PIXELS to twice that, raised as an error), and restored afterwards."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise UsageError(f"--data: {path} declares {width} x {height} pixels, above the limit of {MAX_PIXELS} "
                         "per image (a decompression bomb?); refused")


def _converted(image, layout: Layout) -> tuple[np.ndarray, list[str]]:
    """The decoded image as (H, W, C) float32 in [0, 1]: channels, depth and size the model's."""
    from PIL import Image

    notes = []
    if image.size != (layout.width, layout.height):
        notes.append(f"resized to {layout.width} x {layout.height} (bilinear)")
    if getattr(image, "n_frames", 1) > 1:
        notes.append("animated: first frame taken")  # Image.open stands on frame 0
    if image.mode in SIXTEEN_BIT_MODES:
        notes.append("16-bit: scaled by 1/65535")
        channels = [Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0, mode="F")]
        if layout.channels == 3:
            notes.append("grey -> RGB")
    else:
        target = "RGB" if layout.channels == 3 else "L"
        if image.mode != target:
            notes.append(_conversion_note(image.mode, target))
        if image.format == "JPEG":  # decode a large photo at 1/2, 1/4 or 1/8 scale where that still covers H x W
            image.draft(target, (layout.width, layout.height))
        # a palette with transparency goes through RGBA (Pillow warns on a direct conversion)
        rgb_or_grey = (image.convert("RGBA") if image.mode in ("P", "PA") else image).convert(target)
        channels = [Image.fromarray(np.asarray(band, dtype=np.float32) / 255.0, mode="F")
                    for band in rgb_or_grey.split()]
    planes = [np.asarray(band.resize((layout.width, layout.height), Image.Resampling.BILINEAR), dtype=np.float32)
              for band in channels]
    pixels = np.stack(planes * (layout.channels if len(planes) == 1 else 1), axis=-1)
    return np.clip(pixels, 0.0, 1.0), notes


def _conversion_note(mode: str, target: str) -> str:
    names = {"L": "grey", "RGB": "RGB", "RGBA": "RGBA (alpha dropped)", "LA": "grey+alpha (alpha dropped)",
             "P": "palette", "PA": "palette+alpha (alpha dropped)", "1": "1-bit", "CMYK": "CMYK",
             "YCbCr": "YCbCr"}
    return f"{names.get(mode, mode)} -> {names[target]}"


def _normaliser(mean: tuple[float, ...] | None, std: tuple[float, ...] | None, channels: int):
    """``(x - mean) / std`` over the last (channel) axis, with one value or one per channel."""
    mean_ = _per_channel(mean, channels, "--data-mean", 0.0)
    std_ = _per_channel(std, channels, "--data-std", 1.0)
    if np.any(std_ <= 0):
        raise UsageError(f"--data-std must be > 0, got {','.join(str(s) for s in std)}")
    return lambda x: (x - mean_) / std_


def _per_channel(values: tuple[float, ...] | None, channels: int, option: str, default: float) -> np.ndarray:
    if values is None:
        return np.full(channels, default, np.float32)
    if len(values) not in (1, channels):
        allowed = "1 value" if channels == 1 else f"1 or {channels} values"
        raise UsageError(f"{option} has {len(values)} values; the model's images have {channels} channel(s): "
                         f"give {allowed}")
    return np.broadcast_to(np.asarray(values, np.float32), (channels,))


# ---------------------------------------------------------------------------------------------
# an npz: x (N, *input_shape[1:]) as given, optional y
# ---------------------------------------------------------------------------------------------


def _load_npz(path: Path, input_shape: tuple[int, ...], input_range: tuple[float, float], capacity: int,
              limits: Limits) -> Images:
    from otbr_onnx.evaluate import load_npz

    arrays = load_npz(path, limits.max_file_bytes, "--data")
    source = arrays.source
    if "x" not in arrays:
        raise UsageError(f"{source}: no array 'x' (the images, shape (N, {', '.join(map(str, input_shape[1:]))})); "
                         f"found {', '.join(sorted(arrays)) or 'none'}")
    x, notes = _checked_images(arrays["x"], input_shape, capacity, source)
    _check_range(x, input_range, source)
    y = _checked_labels(arrays["y"], len(arrays["x"]), source)[: len(x)] if "y" in arrays else None
    return Images(x, y, f"npz {path} ({len(x)} images)", notes)


def _checked_images(x: np.ndarray, input_shape: tuple[int, ...], capacity: int,
                    source: str) -> tuple[np.ndarray, list[str]]:
    """``x`` as float32, at most ``capacity`` images, of the model's shape, all finite."""
    expected = tuple(input_shape[1:])
    if x.dtype.kind not in "iuf":
        raise UsageError(f"{source}: array 'x' has dtype {x.dtype}; expected numbers (int or float)")
    if x.ndim != len(input_shape) or tuple(x.shape[1:]) != expected:
        raise UsageError(f"{source}: array 'x' has shape {x.shape}; the model takes (N, "
                         f"{', '.join(map(str, expected))})")
    if len(x) < MIN_IMAGES:
        raise UsageError(f"{source}: array 'x' holds {len(x)} image(s); at least {MIN_IMAGES} are needed")
    notes = []
    if len(x) > capacity:
        notes.append(f"used the first {capacity} of {len(x)} images")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: refused below
        kept = x[:capacity].astype(np.float32)
    bad = ~np.isfinite(kept)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), kept.shape)
        raise UsageError(f"{source}: array 'x' holds {int(bad.sum())} NaN or infinite value(s) (first at image "
                         f"{first[0]}); refused")
    return kept, notes


def _check_range(x: np.ndarray, input_range: tuple[float, float], source: str) -> None:
    """Refuse images whose values clearly lie outside the model's range (0..255 given to a 0..1
    model): more than half the range's width beyond either end. Slight overshoot is let through."""
    low, high = input_range
    slack = 0.5 * (high - low)
    found_low, found_high = float(x.min()), float(x.max())
    if found_high > high + slack or found_low < low - slack:
        raise UsageError(f"{source}: the images range over [{found_low:g}, {found_high:g}], but --input-range is "
                         f"{low:g},{high:g}; give images in the model's range or the right --input-range")


def _checked_labels(y: np.ndarray, count: int, source: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != count:
        raise UsageError(f"{source}: array 'y' has shape {y.shape}; expected one label per image, i.e. ({count},)")
    integral = y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(np.all(np.isfinite(y)))
                                         and bool(np.all(y == np.round(y))))
    if not integral:
        raise UsageError(f"{source}: array 'y' has dtype {y.dtype} with non-integer values; expected class indices")
    if len(y) and y.min() < 0:
        raise UsageError(f"{source}: array 'y' holds the negative label {y.min()}; expected class indices >= 0")
    return y.astype(np.int64)
