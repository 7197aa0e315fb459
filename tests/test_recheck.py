"""The recalibration check (otbr_onnx/recheck.py): a removal that a BatchNorm recalibration on the
user's images re-opens is refused; where the check cannot apply, the report says why."""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from otbr_onnx import CleanOptions, recheck
from otbr_onnx.cli import main
from otbr_onnx.detect import ScanResult
from otbr_onnx.errors import FidelityBudgetError
from otbr_onnx.pipeline import clean
from tests import builders
from tests.conftest import FAST


@pytest.fixture()
def preact_with_data(tmp_path):
    _, model = builders.build_trained("preact")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x, _ = builders.quadrant_images(64, seed=4)
    np.savez(tmp_path / "mine.npz", x=x)
    return path, tmp_path / "mine.npz"


def _flag_everything(options: CleanOptions) -> CleanOptions:
    """A threshold every class passes: the scan suspects a class, so the check has a target."""
    return replace(options, scan_threshold=1e-9)


def test_a_removal_the_recalibration_reopens_is_refused(preact_with_data, monkeypatch, tmp_path):
    path, data = preact_with_data
    seen = []

    def reopened(module, shape, before, *args, **kwargs):
        seen.append(module)
        z = np.zeros(len(before.z))
        z[before.suspected[0]] = 9.0
        return ScanResult(before.margins, z, before.threshold, [before.suspected[0]])

    monkeypatch.setattr(recheck, "rescan_module", reopened)
    options = _flag_everything(CleanOptions(**{**FAST, "ranking": "nwc"}, remover="pruning", data=str(data),
                                            prune_ratio=0.2, max_acc_drop=100.0))
    with pytest.raises(FidelityBudgetError, match="masked"):
        clean(path, options)
    # the module rescanned had its BatchNorm statistics re-estimated on the images
    bn = [m for m in seen[0].modules() if hasattr(m, "running_mean") and m.running_mean is not None]
    assert bn and all(int(m.num_batches_tracked) >= 1 for m in bn)


def test_cli_refusal_of_a_masked_removal_writes_nothing(preact_with_data, monkeypatch, tmp_path):
    path, data = preact_with_data
    monkeypatch.setattr(recheck.Recheck, "masked", property(lambda self: self.run))
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["clean", str(path), str(out), "--iterations", "3", "--batch-size", "16",
                                       "--scan-starts", "2", "--scan-steps", "5", "--scan-threshold", "1e-9",
                                       "--remover", "pruning", "--prune-ratio", "0.2", "--data", str(data),
                                       "--max-acc-drop", "100"])
    assert result.exit_code == 3, result.output
    assert "masked" in result.output and not out.exists()


def test_the_report_says_why_the_check_did_not_run(preact_with_data, tmp_path):
    path, data = preact_with_data
    options = _flag_everything(CleanOptions(**FAST, prune_ratio=0.2))  # no --data
    report = clean(path, options).report
    assert report["recalibration_check"]["run"] is False and "--data" in report["recalibration_check"]["why"]
    _, mlp = builders.build_backdoored(2)
    onnx.save(mlp, tmp_path / "mlp.onnx")
    x, _ = builders.block_images(32, seed=1)
    np.savez(tmp_path / "x.npz", x=x)
    options = _flag_everything(CleanOptions(**FAST, prune_ratio=0.2, data=str(tmp_path / "x.npz"),
                                            remover="pruning", max_acc_drop=100.0))
    report = clean(tmp_path / "mlp.onnx", options).report
    assert report["recalibration_check"]["run"] is False and "BatchNorm" in report["recalibration_check"]["why"]
    json.dumps(report)


def test_the_check_runs_with_data_and_batchnorm(preact_with_data):
    path, data = preact_with_data
    options = _flag_everything(CleanOptions(**FAST, prune_ratio=0.2, data=str(data), remover="pruning",
                                            max_acc_drop=100.0))
    try:
        report = clean(path, options).report
    except FidelityBudgetError as error:  # a real masked removal is a valid outcome too
        assert "masked" in str(error)
        return
    check = report["recalibration_check"]
    assert check["run"] is True and check["masked"] is False and isinstance(check["z_after"], float)
