"""The data stage: the images every later stage reads, from one place.

``Images`` is what ``--data PATH`` loads (``images.load_images``: a folder of PNG/JPEG files, or
an ``.npz`` with ``x`` and optional ``y``), already in the model's input layout, size and value
range. ``pipeline.read_images`` reads them once per model and hands them to every stage that uses
them: detection (trigger inversion in ``scan`` and in ``clean``'s scan and rescan), the ratio
rule's fidelity check (``ratio.reference_set``), the adversarial remover and the recalibration
check (``recheck.py``).

``--calibration`` (clean, labelled images for the ratio rule) has one reader too,
``read_calibration``; ``contents_sha256`` is what a batch rerun compares of both files.
"""

from __future__ import annotations

from pathlib import Path

from otbr_onnx.data.calibration import read_calibration
from otbr_onnx.data.fingerprint import contents_sha256
from otbr_onnx.data.images import Images, load_images

__all__ = ["Images", "check_calibration", "check_data", "contents_sha256", "load_images", "read_calibration",
           "read_data"]


def read_data(options, input_shape: tuple[int, ...]) -> Images:
    """``options.data.path`` (a ``CleanOptions`` with ``data.path`` set) read for a model whose input
    is ``input_shape``, with the options' range, mean, std and limits: the one call the CLI's
    fail-fast check and the stages that use the images share."""
    data = options.data
    return load_images(data.path, input_shape, options.interface.input_range, data.mean, data.std, options.limits)


def check_data(model: Path, options) -> None:
    """Fail fast: read ``options.data.path`` against ``model``'s input before the scan or any output
    (the pipeline reads it again where it uses it). A bad file or folder ends here, exit 2."""
    if options.data.path is None:
        return
    from otbr_onnx.load import load_model

    interface = options.interface
    loaded = load_model(model, interface.input_shape, interface.output_name, options.limits)
    read_data(options, loaded.input_shape)

def check_calibration(options) -> None:
    """Fail fast: ``options.data.calibration`` readable as labelled images, before any model is
    loaded or unlearnt (the ratio rule reads it last, and checks the shape there)."""
    if options.data.calibration is not None:
        read_calibration(options.data.calibration, options.limits.max_file_bytes)
