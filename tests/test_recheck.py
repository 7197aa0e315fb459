"""The recalibration check (otbr_onnx/recheck.py): a removal that a BatchNorm recalibration on the
user's images re-opens is refused; where the check cannot apply, the report says why."""

import json

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
from tests.conftest import FAST, FAST_ARGS


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
    return options.with_(scan={"threshold": 1e-9})


def test_the_rescan_runs_on_the_recalibrated_model(preact_with_data, monkeypatch):
    """The check rescans a copy whose BatchNorm statistics were re-estimated on the images, and
    calls the removal masked when that rescan flags the target again."""
    from otbr_onnx.prepare import prepare

    path, data = preact_with_data
    options = FAST
    prepared = prepare(path, options)
    seen = []

    def reopened(prepared, module, before, options):
        seen.append(module)
        z = np.zeros(len(before.z))
        z[1] = 9.0
        return ScanResult(before.margins, z, before.threshold, [1])

    monkeypatch.setattr(recheck, "rescan_prepared", reopened)
    detection = ScanResult(np.zeros(4), np.zeros(4), 3.5, [1])
    x = np.load(data)["x"]
    check = recheck.recalibration_rescan(prepared, {}, x, detection, None, options)
    assert check.run and check.masked and check.target == 1 and check.z_after == 9.0
    bn = [m for m in seen[0].modules() if getattr(m, "running_mean", None) is not None]
    reference = [m for m in prepared.module.modules() if getattr(m, "running_mean", None) is not None]
    assert bn and all(int(m.num_batches_tracked) >= 1 for m in bn)
    assert not all(np.allclose(a.running_mean.numpy(), b.running_mean.numpy()) for a, b in zip(bn, reference))
    assert recheck.recalibration_rescan(prepared, {}, None, detection, None, options).run is False
    assert recheck.recalibration_rescan(prepared, {}, x, ScanResult(np.zeros(4), np.zeros(4), 3.5, []), None,
                                        options).run is False


def test_cli_refusal_of_a_masked_removal_writes_nothing(preact_with_data, monkeypatch, tmp_path):
    from otbr_onnx import pipeline

    path, data = preact_with_data
    masked = recheck.Recheck(True, "test", 1, 0.0, 9.0, ScanResult(np.zeros(4), np.array([0, 9.0, 0, 0]), 3.5, [1]))
    monkeypatch.setattr(pipeline, "recalibration_rescan", lambda *args, **kwargs: masked)
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["clean", str(path), str(out), *FAST_ARGS, "--remover", "pruning",
                                       "--prune-ratio", "0.2", "--data", str(data), "--max-acc-drop", "100"])
    assert result.exit_code == 3, result.output
    assert "masked" in result.output and "class 1" in result.output and not out.exists()
    assert "(maximum margin z 9.0 above" in result.output  # the test that holds the class, with its own z


def test_the_report_says_why_the_check_did_not_run(preact_with_data, tmp_path):
    path, data = preact_with_data
    options = _flag_everything(FAST.with_(removal={"prune_ratio": 0.2}))  # no --data
    report = clean(path, options).report
    assert report["recalibration_check"]["run"] is False and "--data" in report["recalibration_check"]["why"]
    _, mlp = builders.build_backdoored(2)
    onnx.save(mlp, tmp_path / "mlp.onnx")
    x, _ = builders.block_images(32, seed=1)
    np.savez(tmp_path / "x.npz", x=x)
    options = _flag_everything(FAST.with_(removal={"prune_ratio": 0.2, "remover": "pruning", "max_acc_drop": 100.0},
                                          data={"path": str(tmp_path / "x.npz")}))
    report = clean(tmp_path / "mlp.onnx", options).report
    assert report["recalibration_check"]["run"] is False and "BatchNorm" in report["recalibration_check"]["why"]
    json.dumps(report)
