"""What relearning left (otbr_onnx/removers/residual.py): the relearnt model's scan, and
adversarial unlearning of a class it still flags, within the budget relearning left. On the
tests' BadNets MLP (a 2x2 checkerboard in the corner sends any image to class 2). A "relearning"
with no forgetting and one step stands for a relearnt model the backdoor leaked back into."""

import numpy as np
import onnx
import pytest

from otbr_onnx import CleanOptions, DataOptions, RemovalOptions, ScanOptions
from otbr_onnx.pipeline import clean
from otbr_onnx.prepare import prepare
from otbr_onnx.removers.relearning import RelearnConfig, RelearningRemoval, relearn
from otbr_onnx.removers.residual import holdout_fidelity, unlearn_residual
from tests import builders

TARGET = 2
QUICK_SCAN = ScanOptions(starts=2, steps=20)
LEAKED = RelearnConfig(forget="none", steps=1, eval_every=1)  # the copy is still the backdoored original


def _asr(prepared, weights, x, y) -> float:
    keep = y != TARGET
    scores = prepared.outputs(prepared.with_weights(weights), builders.stamp_trigger(x[keep]))
    return float(np.mean(scores.argmax(1) == TARGET))


def _leaked_copy(model: onnx.ModelProto, folder, seed: int):
    """``model`` saved in ``folder`` with 200 user images, prepared, and "relearnt" by ``LEAKED``."""
    onnx.save(model, folder / "m.onnx")
    x, _ = builders.block_images(200, seed=seed)
    np.savez(folder / "mine.npz", x=x)
    options = CleanOptions(scan=QUICK_SCAN, data=DataOptions(path=str(folder / "mine.npz")))
    prepared = prepare(folder / "m.onnx", options)
    return prepared, x, options, relearn(prepared, x, 100.0, LEAKED), folder


@pytest.fixture(scope="module")
def leaked(tmp_path_factory):
    return _leaked_copy(builders.build_backdoored(TARGET)[1], tmp_path_factory.mktemp("residual"), seed=11)


def test_a_class_the_relearnt_model_still_serves_is_found_and_unlearnt(leaked):
    prepared, x, options, relearnt, _ = leaked
    xt, yt = builders.block_images(400, seed=99)  # test images, never seen by the remover
    assert _asr(prepared, relearnt.weights, xt, yt) > 0.9
    residual = unlearn_residual(prepared, relearnt.weights, relearnt.log.kept.expected_drop, x, None, options)
    assert residual.targets == [TARGET] and residual.unlearnt and residual.skipped is None
    assert _asr(prepared, residual.weights, xt, yt) < 0.2
    # measured against the original, within the whole budget, and what the report says it is
    assert residual.expected_drop <= options.max_acc_drop
    assert (residual.expected_drop, residual.agreement) == holdout_fidelity(prepared, residual.weights, x, 0)
    before = prepared.outputs(prepared.module, xt).argmax(1)
    after = prepared.outputs(prepared.with_weights(residual.weights), xt).argmax(1)
    assert np.mean(before == after) > 0.85
    assert residual.as_dict()["rescan_after_relearning"] == [TARGET]


def test_no_budget_left_leaves_the_relearnt_weights_and_says_why(leaked):
    prepared, x, options, relearnt, _ = leaked
    residual = unlearn_residual(prepared, relearnt.weights, options.max_acc_drop, x, None, options)
    assert residual.targets == [TARGET] and not residual.unlearnt
    assert residual.weights is relearnt.weights
    assert "spent the accuracy budget" in residual.skipped


def test_a_relearnt_model_the_scan_passes_is_handed_back_as_relearnt(tmp_path):
    prepared, x, options, relearnt, _ = _leaked_copy(builders.build_backdoored(None)[1], tmp_path, seed=5)  # clean twin
    residual = unlearn_residual(prepared, relearnt.weights, 0.0, x, None, options)
    if residual.targets:
        pytest.skip("the quick scan flagged the clean twin")
    assert not residual.unlearnt and residual.weights is relearnt.weights
    assert "flags no class" in residual.skipped


def test_clean_with_unlearn_residual_reports_the_relearnt_models_scan(leaked):
    _, _, options, relearnt, folder = leaked
    asked = options.with_(removal={"unlearn_residual": "scan", "max_acc_drop": 5.0})
    result = clean(folder / "m.onnx", asked)
    section = result.report["removal"]["residual"]
    assert result.report["remover"]["name"] == "relearning"
    assert set(section) >= {"rescan_after_relearning", "unlearnt", "skipped", "expected_accuracy_drop"}
    if section["rescan_after_relearning"]:
        assert "relearnt model's scan flagged class" in result.report["verdict"]
    else:
        assert section["skipped"] == "the relearnt model's scan flags no class" and not section["unlearnt"]
    assert section["detector"] == "scan"
    from otbr_onnx.report import summary_text
    assert "relearnt model's scan: flagged" in summary_text(result.report)
    assert "residual" not in RelearningRemoval(relearnt, None).as_dict()["removal"]  # none run: no section


def test_the_command_line_picks_the_residual_search_and_refuses_others(tmp_path):
    from click.testing import CliRunner
    from otbr_onnx.cli import main
    from otbr_onnx.errors import UsageError
    from otbr_onnx.options import from_command_line
    assert RemovalOptions().unlearn_residual == "off"  # neither search helped on the held-out split
    assert from_command_line(False, {}, unlearn_residual="minimal").removal.unlearn_residual == "minimal"
    with pytest.raises(UsageError, match="--unlearn-residual must be one of"):
        RemovalOptions(unlearn_residual="always").validate()
    result = CliRunner().invoke(main, ["clean", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"),
                                       "--unlearn-residual", "always"])
    assert result.exit_code == 2 and "always" in result.output and not (tmp_path / "o.onnx").exists()


def test_the_minimal_search_picks_the_class_to_unlearn(leaked):
    prepared, x, options, relearnt, _ = leaked
    residual = unlearn_residual(prepared, relearnt.weights, 0.0, x, None, options, detector="minimal")
    assert residual.detector == "minimal" and residual.searched_by == "minimal-trigger search"
    assert residual.targets == [TARGET] and residual.unlearnt  # the 2x2 patch needs a far smaller mask
    xt, yt = builders.block_images(400, seed=99)
    assert _asr(prepared, residual.weights, xt, yt) < 0.2
    assert residual.as_dict()["detector"] == "minimal"
