"""The adversarial remover (otbr_onnx/removers/adversarial.py) and the trigger families it searches
(otbr_onnx/triggers.py), on the tests' BadNets MLP: a 2x2 checkerboard in the corner sends any
image to class 2."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from otbr_onnx import CleanOptions, DataOptions, RemovalOptions, ScanOptions, triggers
from otbr_onnx.cli import main
from otbr_onnx.errors import UsageError
from otbr_onnx.pipeline import clean
from otbr_onnx.removers import adversarial
from tests import builders

TARGET = 2


def _asr(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    keep = y != TARGET
    return float(np.mean(builders.logits(model, builders.stamp_trigger(x[keep])).argmax(1) == TARGET))


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    _, model = builders.build_backdoored(TARGET)
    folder = tmp_path_factory.mktemp("adv")
    path = folder / "bd.onnx"
    onnx.save(model, path)
    x, _ = builders.block_images(200, seed=11)  # the user's clean, unlabeled images
    np.savez(folder / "mine.npz", x=x)
    return path, folder / "mine.npz", model


def test_adversarial_clean_removes_the_patch_backdoor_and_keeps_answers(backdoored, tmp_path):
    path, data, model = backdoored
    x, y = builders.block_images(400, seed=99)  # test images, never seen by the remover
    assert _asr(model, x, y) > 0.9
    options = CleanOptions(scan=ScanOptions(starts=2, steps=20), data=DataOptions(path=str(data)),
                           removal=RemovalOptions(remover="adversarial", always=True))
    result = clean(path, options)
    cleaned = result.model
    assert _asr(cleaned, x, y) < 0.2
    before, after = builders.logits(model, x).argmax(1), builders.logits(cleaned, x).argmax(1)
    assert np.mean(before == after) > 0.9
    removal = result.report["removal"]
    assert removal["remover"] == "adversarial" and removal["chosen_round"] >= 1
    assert removal["images"] == {"train": 150, "holdout": 50}
    kept = removal["rounds"][removal["chosen_round"] - 1]["reach"]
    assert any(kept.get(f, 0.0) < reach for f, reach in removal["original"]["reach"].items())
    from otbr_onnx.html_report import unlearning_section
    section = unlearning_section(result.report)
    assert section.count('<tr class="chosen">') == 1 and "<td class=\"text\">original</td>" in section
    assert section.count("<tr") == 2 + len(removal["rounds"])  # header, original, every round
    assert result.report["data"]["images"] == 200 and result.parity.ok
    # graph surgery, not a new graph: the same nodes, only initializer values changed
    assert [n.op_type for n in cleaned.graph.node] == [n.op_type for n in model.graph.node]
    changed = [t.name for t, u in zip(cleaned.graph.initializer, model.graph.initializer)
               if t.raw_data != u.raw_data]
    assert changed and all(name.startswith("fc") for name in changed)


def test_remover_auto_is_relearning_with_data_unless_pruning_is_asked_for():
    data = DataOptions(path="d.npz")
    assert CleanOptions(data=data).resolved_remover == "relearning"
    assert CleanOptions().resolved_remover == "pruning"  # no images: the data-free remover
    for pruning_only in (RemovalOptions(method="clp"), RemovalOptions(prune_ratio=0.05), RemovalOptions(reference=True)):
        assert CleanOptions(data=data, removal=pruning_only).resolved_remover == "pruning"
    assert CleanOptions(data=DataOptions(path="d.npz", calibration="c.npz")).resolved_remover == "pruning"
    assert CleanOptions(data=data, removal=RemovalOptions(remover="pruning")).resolved_remover == "pruning"
    adversarial = RemovalOptions(remover="adversarial")
    with pytest.raises(UsageError, match="--data"):
        CleanOptions(removal=adversarial).validate()


def test_adversarial_without_data_is_one_line_exit_2(backdoored, tmp_path):
    path, _, _ = backdoored
    result = CliRunner().invoke(main, ["clean", str(path), str(tmp_path / "o.onnx"), "--remover", "adversarial"])
    assert result.exit_code == 2
    assert "--data" in result.output and not (tmp_path / "o.onnx").exists()


def test_expected_accuracy_drop_charges_a_confident_answer_more_than_an_unsure_one():
    reference = torch.tensor([[0.9, 0.1, 0.0], [0.4, 0.35, 0.25], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    kept = reference.argmax(1)
    assert adversarial.expected_accuracy_drop(reference, kept) == 0.0
    confident = torch.tensor([1, 0, 1, 2])  # the first image's 0.9 answer becomes its 0.1 one
    unsure = torch.tensor([0, 1, 1, 2])  # the second image's 0.4 answer becomes its 0.35 one
    assert adversarial.expected_accuracy_drop(reference, confident) == pytest.approx(100 * 0.8 / 4)
    assert adversarial.expected_accuracy_drop(reference, unsure) == pytest.approx(100 * 0.05 / 4)


def test_only_the_families_the_detector_flagged_are_unlearnt():
    every = triggers.FAMILIES
    assert adversarial.unlearnt_families({2: ["patch"]}, [2], every) == ("patch",)
    assert adversarial.unlearnt_families({2: ["warp", "patch"], 5: ["additive"]}, [2, 5], every) == every
    assert adversarial.unlearnt_families({5: ["patch"]}, [2], every) == every  # nothing for this target
    assert adversarial.unlearnt_families(None, [2], every) == every  # the margin scan alone


def test_student_trains_only_the_listed_tensors():
    model = builders.Mlp()
    student, params, frozen = adversarial._student(model, [model.fc1.weight, model.fc3.bias], "cpu")
    assert [p.shape for p in params] == [model.fc1.weight.shape, model.fc3.bias.shape] and not frozen
    assert all(not p.requires_grad for name, p in student.named_parameters()
               if name not in ("fc1.weight", "fc3.bias"))
    assert all(p.requires_grad for p in model.parameters())  # the input module is not touched


def test_unlearning_keeps_the_original_when_no_round_fits_the_budget(monkeypatch):
    """A fidelity budget no round can meet hands back the reference, unchanged, with chosen = -1."""
    monkeypatch.setattr(adversarial, "expected_accuracy_drop", lambda reference, answers: 101.0)
    model, _ = builders.build_backdoored(TARGET)
    x, _ = builders.block_images(40, seed=3)
    config = adversarial.AdversarialConfig(rounds=1, train_steps=2, search=triggers.Search(steps=2))
    weights = [model.fc1.weight, model.fc1.bias]
    out, log = adversarial.unlearn(model, weights, x, [TARGET], lambda m, b: m(b), (0.0, 1.0), 2.0, config)
    assert log.chosen == -1 and len(log.rounds) == 1
    assert torch.equal(out.fc1.weight, model.fc1.weight)


@pytest.mark.parametrize("family", triggers.FAMILIES)
def test_every_trigger_family_stays_in_range_and_within_budget(family):
    x = torch.rand(8, 1, 8, 8)
    trigger = triggers.make(family, (1, 8, 8), (0.0, 1.0), eps=0.1, max_shift=1.0)
    with torch.no_grad():
        for p in trigger.parameters():
            p.add_(torch.randn_like(p) * 5)
    trigger.project()
    out = trigger(x)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert 0.0 <= float(trigger.size()) <= 1.0
    if family == "additive":
        assert float((out - x).abs().max()) <= 0.1 + 1e-6
    if family == "warp":
        assert float(trigger.flow().abs().max()) <= 1.0 + 1e-6


def test_patch_search_finds_the_backdoor_and_not_on_a_clean_twin():
    """Inverting towards the target: the backdoored model is sent there by a small mask; its
    clean twin, under the same search, much less."""
    x, _ = builders.block_images(128, seed=5)
    reach = {}
    for name, target in (("backdoored", TARGET), ("clean", None)):
        model, _ = builders.build_backdoored(target)
        model.eval().requires_grad_(False)
        labels = model(torch.from_numpy(x)).argmax(1)
        keep = labels != TARGET
        trigger = triggers.make("patch", (1, 8, 8), (0.0, 1.0))
        triggers.optimise(trigger, model, torch.from_numpy(x)[keep], labels[keep], triggers.towards(TARGET),
                          triggers.Search(steps=60, size_weight=2.0))
        reach[name] = (triggers.flipped(trigger, model, torch.from_numpy(x)[keep], labels[keep], TARGET),
                       float(trigger.size()))
    assert reach["backdoored"][0] > 0.8
    assert reach["backdoored"][1] < reach["clean"][1] or reach["clean"][0] < 0.5


def test_reach_fell_needs_one_family_lower_than_on_the_original():
    original = adversarial.Round(0, 100.0, {"patch": 100.0, "additive": 100.0}, 0.0)
    assert adversarial.reach_fell(original, adversarial.Round(1, 95.0, {"patch": 96.0, "additive": 100.0}, 0.0))
    assert not adversarial.reach_fell(original, adversarial.Round(1, 95.0, {"patch": 100.0, "additive": 100.0}, 0.0))
    assert adversarial.reach_fell(None, None)  # no judge ran: nothing to compare


def test_a_round_that_lowered_no_reach_is_refused(backdoored):
    """Unlearning that changed nothing (no weight updates): the rescan might clear it, but the
    remover's own judge sees the triggers reach as far as on the original, and refuses."""
    from otbr_onnx.errors import FidelityBudgetError
    from otbr_onnx.prepare import prepare

    path, data, _ = backdoored
    options = CleanOptions(data=DataOptions(path=str(data)),
                           removal=RemovalOptions(remover="adversarial", max_acc_drop=100.0))
    prepared = prepare(path, options)
    x = np.load(data)["x"]
    config = adversarial.AdversarialConfig(rounds=1, train_steps=0, families=("patch",),
                                           search=triggers.Search(steps=30, batch=64, lr=0.1))
    with pytest.raises(FidelityBudgetError, match="did not lower the reach of any trigger"):
        adversarial.remove(prepared, x, [TARGET], options, config=config)


def test_a_target_the_rescan_still_flags_is_refused(backdoored, monkeypatch, tmp_path):
    """The adversarial path keeps the pruning path's rule: no model handed back while the rescan
    still flags the target."""
    from otbr_onnx import pipeline
    from otbr_onnx.detect import ScanResult
    from otbr_onnx.errors import FidelityBudgetError
    from otbr_onnx.removers import unlearning

    path, data, _ = backdoored

    def flags_target(prepared, module, before, options):
        z = np.zeros(len(before.z))
        z[TARGET] = 9.0
        return ScanResult(before.margins, z, before.threshold, [TARGET])

    monkeypatch.setattr(unlearning, "rescan_prepared", flags_target)
    monkeypatch.setattr(pipeline, "detect", lambda *a, **k: ScanResult(np.zeros(8), np.eye(8)[TARGET] * 9, 3.5,
                                                                     [TARGET]))
    options = CleanOptions(scan=ScanOptions(starts=2, steps=5), data=DataOptions(path=str(data)),
                           removal=RemovalOptions(remover="adversarial", max_acc_drop=100.0))
    with pytest.raises(FidelityBudgetError, match=f"still flags class {TARGET}"):
        clean(path, options)


def test_the_clean_verdict_names_a_class_the_final_scan_still_flags():
    """A final scan (the fresh scan of the model handed back) that flags a class: the verdict
    names it, as a scan of the written file would; nothing flagged: the verdict is the remover's."""
    from otbr_onnx.detect import ScanResult
    from otbr_onnx.pipeline import with_final_scan

    after = ScanResult(np.zeros(4), np.array([0.0, 0, 5.0, 0]), 3.5, [2])
    assert "flags class 2" in with_final_scan("cleaned", after) and "exit 6" in with_final_scan("cleaned", after)
    quiet = ScanResult(np.zeros(4), np.zeros(4), 3.5, [])
    assert with_final_scan("cleaned", quiet) == "cleaned" == with_final_scan("cleaned", None)