"""ACC, ASR, RA and DER of ONNX classifiers on labelled image sets (BackdoorBench conventions).

Used by ``otbr-onnx eval`` and the benchmarks; the cleaning pipeline itself never sees data.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from numpy.lib import format as npy_format

from converters import runtime
from converters.chunking import Chunking
from converters.single_score import as_class_scores
from otbr_onnx.errors import UnsupportedModelError, UsageError, one_line
from otbr_onnx.files import open_regular
from otbr_onnx.load import MAX_FILE_BYTES, Limits, LoadedModel, load_model, ort_errors

NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what can be an image or a label
# Fixed-width strings cannot carry code (only pickled objects can): kept as metadata, such as the
# 'attack' name in models/demo_eval.npz; images and labels are still checked to be numeric.
METADATA_KINDS = "US"


@dataclass(frozen=True)
class Metrics:
    acc: float  # % of clean images classified correctly
    asr: float | None  # % of triggered non-target images classified as the target
    ra: float | None  # % of triggered non-target images classified as their true label
    clean_samples: int
    poisoned_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


class Arrays(dict):
    """The arrays of one npz, and where they came from (``--data eval.npz``) for messages."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str) -> None:
        super().__init__(arrays)
        self.source = source


def _where(data: dict) -> str:
    return f"{data.source}: " if isinstance(data, Arrays) else ""


def load_npz(path: str | Path, max_bytes: int = MAX_FILE_BYTES, option: str | None = None) -> Arrays:
    """Read an evaluation or calibration set from a stranger, refusing anything odd with exit 2.

    Only a regular file (a FIFO would block), only numeric or fixed-width text arrays (never
    pickled objects, which can carry code), and every array's header is read and checked against ``max_bytes`` and
    against the bytes the archive really holds *before* numpy allocates what the header
    declares (numpy allocates the declared size first, then fills it: a 100-byte file can
    declare terabytes). ``option`` names the flag in messages.
    """
    source = f"{option} {path}" if option else str(path)
    with open_regular(Path(path), "an .npz file") as handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as error:
            raise UsageError(f"{source}: cannot read as .npz (not a zip archive of .npy arrays)") from error
        with archive:
            members = _checked_members(archive, source, max_bytes)
            return Arrays({key: _read_member(archive, info, key, source) for key, info in members.items()}, source)


def _checked_members(archive: zipfile.ZipFile, source: str, max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """Array name -> zip entry, each header checked; nothing large is read yet."""
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in archive.infolist():
        key = info.filename.removesuffix(".npy")
        shape, dtype, header_bytes = _npy_header(archive, info, key, source)
        if dtype.kind not in NUMERIC_KINDS + METADATA_KINDS:
            raise UsageError(f"{source}: array '{key}' has dtype {dtype}; expected numbers (bool, int or float) "
                             f"or fixed-width text")
        declared = math.prod(shape) * dtype.itemsize
        if declared > info.file_size - header_bytes:
            raise UsageError(f"{source}: array '{key}' declares shape {shape} ({declared} bytes) but holds only "
                             f"{max(info.file_size - header_bytes, 0)} bytes of data")
        total += declared
        if total > max_bytes:
            raise UsageError(f"{source}: the arrays declare more than the --max-file-bytes limit of {max_bytes} bytes "
                             f"(array '{key}' has shape {shape})")
        members[key] = info
    if not members:
        raise UsageError(f"{source}: the archive holds no arrays")
    return members


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str,
                source: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of one member, read with numpy's own header parser."""
    try:
        with archive.open(info) as member:
            version = npy_format.read_magic(member)
            readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _fortran, dtype = readers[version](member)
            return tuple(shape), np.dtype(dtype), member.tell()
    except (ValueError, TypeError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, NotImplementedError,
            zlib.error) as error:
        raise UsageError(f"{source}: array '{key}' is not a readable .npy array ({one_line(error, 'bad header')})") from error


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, source: str) -> np.ndarray:
    try:
        with archive.open(info) as member:
            return npy_format.read_array(member, allow_pickle=False)
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, MemoryError, zlib.error) as error:
        # a CRC mismatch or a stream shorter than its header says ends here, not in an allocation
        raise UsageError(f"{source}: array '{key}' cannot be read ({one_line(error, type(error).__name__)})") from error


def npz_target(data: dict[str, np.ndarray], default: int = 0) -> int:
    """The attack target class stored as ``target`` in an evaluation npz, checked."""
    if "target" not in data:
        return default
    value = data["target"]
    if value.size != 1 or value.dtype.kind not in "iu" or int(value.reshape(-1)[0]) < 0:
        raise UsageError(f"{_where(data)}array 'target' must be one non-negative integer class, got dtype {value.dtype} "
                         f"shape {value.shape}")
    return int(value.reshape(-1)[0])


def split_sets(clean: dict, poisoned: dict | None) -> tuple[tuple, tuple | None]:
    """(x, y) for clean images and, if any, for triggered images with their true labels.

    One file may hold both (``x_clean, y_clean, x_poisoned, y_poisoned``); a separate file
    holds ``x, y`` (or the same long names). Every array is checked (``_checked_pair``): a bad
    one is a usage error naming it, never a crash later.
    """
    def pick(data: dict, kind: str) -> tuple | None:
        for xs, ys in ((f"x_{kind}", f"y_{kind}"), ("x", "y")):
            if xs in data and ys in data:
                return _checked_pair(data, xs, ys)
        return None

    clean_set = pick(clean, "clean")
    if clean_set is None:
        raise UsageError(f"{_where(clean)}the npz must hold arrays x_clean/y_clean (or x/y)")
    poisoned_set = pick(poisoned, "poisoned") if poisoned is not None else None
    if poisoned_set is None and poisoned is None and "x_poisoned" in clean:
        if "y_poisoned" not in clean:
            raise UsageError(f"{_where(clean)}array 'x_poisoned' has no 'y_poisoned' labels beside it")
        poisoned_set = _checked_pair(clean, "x_poisoned", "y_poisoned")
    return clean_set, poisoned_set


def _checked_pair(data: dict, xs: str, ys: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``data[xs]`` as float32 (N, ...) and labels ``data[ys]`` as int64 (N,)."""
    x, y, where = np.asarray(data[xs]), np.asarray(data[ys]), _where(data)
    if x.dtype.kind not in NUMERIC_KINDS or x.ndim < 2:
        raise UsageError(f"{where}array '{xs}' has dtype {x.dtype} and shape {x.shape}; expected numeric images (N, C, H, W)")
    if len(x) == 0:
        raise UsageError(f"{where}array '{xs}' is empty; expected at least one image")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"{where}array '{ys}' has shape {y.shape}; expected one label per image of '{xs}', i.e. ({len(x)},)")
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        raise UsageError(f"{where}array '{ys}' has dtype {y.dtype} with non-integer values; expected integer class labels")
    if y.min() < 0:
        raise UsageError(f"{where}array '{ys}' holds the negative label {y.min()}; expected class indices >= 0")
    return x.astype(np.float32), y.astype(np.int64)


def check_sets(loaded: LoadedModel, clean: tuple, poisoned: tuple | None, target: int) -> None:
    """Images of the model's input shape, labels and target below its class count (exit 2 if not).

    Checked before onnxruntime runs: a wrong shape there was an internal error (exit 1).
    """
    expected = tuple(loaded.input_shape[1:])
    classes = declared_classes(loaded)
    for kind, pair in (("clean", clean), ("triggered", poisoned)):
        if pair is None:
            continue
        x, y = pair
        if tuple(x.shape[1:]) != expected:
            raise UsageError(f"the {kind} images have shape {tuple(x.shape[1:])}; the model expects {expected}")
        if classes is not None and len(y) and int(y.max()) >= classes:
            raise UsageError(f"the {kind} labels go up to {int(y.max())}; the model has {classes} classes")
    if classes is not None and target >= classes:
        raise UsageError(f"--target {target} is not a class of the model ({classes} classes)")


def declared_classes(loaded: LoadedModel) -> int | None:
    """Class count from the declared (N, classes) output, if fixed; load/checks.py checked the rank.
    A binary classifier's single column counts as two classes."""
    if loaded.single_score is not None:
        return 2
    dims = loaded.proto.graph.output[loaded.output_index].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 1 else None


def predict(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    try:
        sess = runtime.session(model)
        inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        # runtime.run feeds a fixed-batch model at its own batch size
        scores = [runtime.run(sess, inp, out, x[start:stop]) for start, stop in Chunking(batch_size).spans(len(x))]
    except ort_errors() as error:  # the images were checked: what fails now is the model
        raise UnsupportedModelError(f"onnxruntime cannot run the model on the images: {one_line(error)}") from error
    if any(s.ndim != 2 for s in scores):
        raise UnsupportedModelError(f"the output has shape {scores[0].shape}; expected class scores of shape (N, classes)")
    # a binary classifier's one logit or probability: class 1 above 0 / 0.5, not argmax of one column
    return np.concatenate([as_class_scores(s, model.graph, out).argmax(axis=1) for s in scores])


def evaluate(model: onnx.ModelProto, clean: tuple, poisoned: tuple | None, target: int) -> Metrics:
    return scored(lambda x: predict(model, x), clean, poisoned, target)


def scored(classify: Callable[[np.ndarray], np.ndarray], clean: tuple, poisoned: tuple | None,
           target: int) -> Metrics:
    """ACC, ASR and RA of any classifier given as ``classify(images) -> labels`` (an ONNX model in
    ``evaluate``; a torch module in the benchmarks)."""
    x, y = clean
    acc = 100.0 * float(np.mean(classify(x) == y))
    if poisoned is None:
        return Metrics(acc, None, None, len(y), 0)
    xp, yp = poisoned
    keep = yp != target  # images already of the target class say nothing about the trigger
    pred = classify(xp[keep])
    asr = 100.0 * float(np.mean(pred == target))
    ra = 100.0 * float(np.mean(pred == yp[keep]))
    return Metrics(acc, asr, ra, len(y), int(keep.sum()))


def der(before: Metrics, after: Metrics) -> float | None:
    """Defense effectiveness rating in [0, 1]: ASR removed, minus ACC lost, rescaled."""
    if before.asr is None or after.asr is None:
        return None
    asr_drop = max(0.0, before.asr - after.asr) / 100.0
    acc_drop = max(0.0, before.acc - after.acc) / 100.0
    return (asr_drop - acc_drop + 1.0) / 2.0


@dataclass(frozen=True)
class Evaluation:
    """``otbr-onnx eval``: a model's metrics on the sets and, with the model before cleaning,
    that model's metrics and the DER between them."""

    model: str
    target: int
    metrics: Metrics
    original: Metrics | None = None

    @property
    def der(self) -> float | None:
        return der(self.original, self.metrics) if self.original is not None else None

    def as_dict(self) -> dict:
        out = {"model": self.model, "target": self.target, "metrics": self.metrics.as_dict()}
        if self.original is not None:
            out["original"] = self.original.as_dict()
            out["der"] = self.der
        return out


def evaluate_files(model: Path, data: Path, poisoned: Path | None = None, target: int | None = None,
                   original: Path | None = None, limits: Limits | None = None) -> Evaluation:
    """Read the sets (``data``: clean and maybe triggered images; ``poisoned``: triggered ones),
    check them against ``model`` (and ``original``) and measure both. ``target``: the attack's
    class (default: ``target`` in the npz, else 0). Every bad input is a ``UsageError`` before
    onnxruntime runs."""
    caps = limits or Limits()
    arrays = load_npz(data, caps.max_file_bytes, "--data")
    triggered = load_npz(poisoned, caps.max_file_bytes, "--poisoned") if poisoned else None
    clean_set, poisoned_set = split_sets(arrays, triggered)
    goal = target if target is not None else npz_target(arrays)
    metrics = _checked_metrics(load_model(model, limits=caps), clean_set, poisoned_set, goal)
    before = None
    if original is not None:
        before = _checked_metrics(load_model(original, limits=caps), clean_set, poisoned_set, goal)
    return Evaluation(str(model), goal, metrics, before)


def _checked_metrics(loaded: LoadedModel, clean: tuple, poisoned: tuple | None, target: int) -> Metrics:
    check_sets(loaded, clean, poisoned, target)
    return evaluate(loaded.proto, clean, poisoned, target)
