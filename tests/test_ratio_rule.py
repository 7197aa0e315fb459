"""The data-free choice of the pruning ratio: candidates, the budget scan, and the probes it uses."""

import numpy as np
import pytest
import torch

from converters.to_torch import convert
from otbr_onnx import FidelityBudgetError, clean
from otbr_onnx.probes import ProbeConfig, _BatchNormStatistics, probe_classes, synthesise_probes
from otbr_onnx.ratio import CANDIDATE_RATIOS, Trial, choose_ratio, distinct_candidates
from otbr_onnx.sizing import Chunking
from tests import builders
from tests.conftest import FAST

SELECTING = FAST.with_(data={"probes": 16})  # no prune_ratio: the ratio is chosen


# --- candidates -------------------------------------------------------------------------------

def test_candidates_that_prune_nothing_or_the_same_are_dropped():
    # 150 neurons: 0.005 prunes 0; the rest prune 1, 3, 4, 7, 15 neurons
    assert distinct_candidates((0.005, 0.01, 0.02, 0.03, 0.05, 0.1), 150) == [0.01, 0.02, 0.03, 0.05, 0.1]
    # 60 neurons: 0.02 and 0.03 both prune one neuron; the larger ratio stands for the count
    assert distinct_candidates((0.01, 0.02, 0.03, 0.05), 60) == [0.03, 0.05]
    assert distinct_candidates(CANDIDATE_RATIOS, 4) == []


# --- the scan ----------------------------------------------------------------------------------

def _scorer(scores: dict[float, float]):
    asked = []

    def trial_at(ratio: float) -> Trial:
        asked.append(ratio)
        return Trial(ratio, scores[ratio])

    return trial_at, asked


def test_scan_keeps_the_last_ratio_within_budget_and_stops_at_the_first_over_it():
    score_at, asked = _scorer({0.01: 99.0, 0.02: 95.0, 0.05: 80.0, 0.1: 99.0})
    trials, chosen = choose_ratio([0.01, 0.02, 0.05, 0.1], score_at, baseline=100.0, budget=5.0)
    assert chosen == 0.02
    assert asked == [0.01, 0.02, 0.05]  # 0.1 never tried: damage past the first failure is assumed
    assert [t.strength for t in trials] == asked


def test_scan_takes_the_largest_candidate_when_all_fit():
    score_at, asked = _scorer({0.01: 100.0, 0.02: 99.0})
    _, chosen = choose_ratio([0.01, 0.02], score_at, baseline=100.0, budget=1.0)
    assert chosen == 0.02 and asked == [0.01, 0.02]


def test_scan_chooses_nothing_when_the_smallest_candidate_is_over_budget():
    score_at, asked = _scorer({0.01: 50.0, 0.02: 99.0})
    _, chosen = choose_ratio([0.01, 0.02], score_at, baseline=100.0, budget=10.0)
    assert chosen is None and asked == [0.01]
    with pytest.raises(ValueError):
        choose_ratio([], score_at, 100.0, 1.0)


# --- probes --------------------------------------------------------------------------------------

def test_probe_classes_cover_every_class_or_sample_distinct_ones():
    assert probe_classes(8, 3, seed=0).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    many = probe_classes(8, 1000, seed=0)
    assert len(set(many.tolist())) == 8 and many.max() < 1000
    assert many.tolist() == probe_classes(8, 1000, seed=0).tolist()


def _converted(kind: str):
    _, proto = builders.build_trained(kind)
    module = convert(proto)
    module.eval()
    return module


@pytest.mark.parametrize("kind", ["chain", "preact"])
def test_probes_are_classified_as_their_class_and_leave_the_model_untouched(kind):
    module = _converted(kind)
    module.train()  # synthesis must not leave it in another mode, nor touch weights or BN stats
    before = {k: v.clone() for k, v in module.state_dict().items()}
    config = ProbeConfig(count=16, steps=30, seed=0, input_range=(-1.0, 2.0))
    x = synthesise_probes(module, (1, 1, 8, 8), 4, 0, False, config)
    assert x.shape == (16, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 2.0
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    module.eval()
    with torch.no_grad():
        answers = module(torch.from_numpy(x)).argmax(1).numpy()
    assert np.mean(answers == probe_classes(16, 4, 0)) >= 0.9  # a probe reaches its class
    again = synthesise_probes(module, (1, 1, 8, 8), 4, 0, False, config)
    assert np.array_equal(x, again)


def test_batchnorm_prior_pulls_probe_statistics_towards_the_running_ones():
    module = _converted("preact")
    statistics = _BatchNormStatistics(module)
    kept = sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())  # the export folds some
    assert kept >= 1 and len(statistics.handles) == kept

    def gap(bn_prior: float) -> float:
        x = synthesise_probes(module, (1, 1, 8, 8), 4, 0, False, ProbeConfig(count=32, bn_prior=bn_prior))
        with torch.no_grad():
            module(torch.from_numpy(x))
        return float(statistics.distance().detach())

    with_prior, without = gap(1.0), gap(0.0)
    statistics.remove()
    assert with_prior < without


# --- the pipeline ---------------------------------------------------------------------------------

def _consistent(selection: dict, ratio: float) -> None:
    trials = selection["trials"]
    within = [selection["baseline"] - t["score"] <= selection["budget"] for t in trials]
    assert all(within[:-1]), "the scan went on past a candidate over budget"
    assert selection["chosen_ratio"] == ratio == max(t["ratio"] for t, ok in zip(trials, within) if ok)


@pytest.mark.parametrize("kind", ["chain", "preact"])
def test_default_chooses_the_ratio_on_synthesised_probes(kind):
    _, model = builders.build(kind)
    report = clean(model, SELECTING).report
    selection = report["ratio_selection"]
    assert selection["source"] == "synthesised probes" and selection["metric"] == "soft agreement"
    assert selection["images"] == 16 and selection["baseline"] == 100.0 and selection["budget"] == 10.0
    _consistent(selection, report["pruning"]["ratio"])
    assert report["pruning"]["pruned_neurons"] >= 1  # never an unchanged model passed as cleaned
    assert selection["rule"] == "largest ratio within the budget"  # nothing suspected: fidelity first


def test_an_unlimited_budget_tries_every_candidate_and_keeps_the_largest():
    _, model = builders.build("preact")
    report = clean(model, SELECTING.with_(removal={"max_disagreement": 100.0})).report
    selection = report["ratio_selection"]
    _consistent(selection, report["pruning"]["ratio"])
    ranked = report["pruning"]["ranked_neurons"]
    assert [t["ratio"] for t in selection["trials"]] == distinct_candidates(CANDIDATE_RATIOS, ranked)
    assert selection["chosen_ratio"] == max(CANDIDATE_RATIOS)


def test_a_budget_nothing_meets_is_refused(tmp_path):
    _, model = builders.build_trained("preact")
    x, _ = builders.quadrant_images(256, seed=3)
    answers = builders.logits(model, x).argmax(1)
    np.savez(tmp_path / "calib.npz", x=x, y=answers)
    # Labelled with the original's own answers (baseline 100%): a zero budget allows no changed
    # answer at all, and one pruned-and-fused neuron changes some of 256.
    with pytest.raises(FidelityBudgetError, match="max-acc-drop 0"):
        clean(model, SELECTING.with_(data={"calibration": str(tmp_path / "calib.npz")}, removal={"max_acc_drop": 0.0}))


def test_a_fixed_ratio_skips_the_selection():
    _, model = builders.build("chain")
    report = clean(model, SELECTING.with_(removal={"prune_ratio": 0.2})).report
    assert report["ratio_selection"] is None and report["pruning"]["ratio"] == 0.2
    assert "ratio_selection" not in report["seconds"]


def test_progress_covers_probe_synthesis_and_the_candidates_tried():
    _, model = builders.build("chain")
    calls = []
    report = clean(model, SELECTING, progress=lambda *call: calls.append(call)).report
    probe_steps = [done for stage, done, _ in calls if stage == "probes"]
    assert probe_steps == list(range(1, ProbeConfig().steps + 1))
    tried = [done for stage, done, _ in calls if stage == "ratio candidates"]
    assert tried == list(range(1, len(report["ratio_selection"]["trials"]) + 1))


def test_soft_agreement_falls_when_confidence_in_the_original_answers_falls():
    from types import SimpleNamespace

    from otbr_onnx.prepare import PreparedModel
    from otbr_onnx.ratio import ReferenceSet

    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    sharp, flat = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with torch.no_grad():
        flat.weight.copy_(sharp.weight * 0.2)  # same answers (argmax), less confidence
        flat.bias.copy_(sharp.bias * 0.2)
    y = sharp(torch.from_numpy(x)).argmax(1).numpy()
    probes = ReferenceSet("synthesised probes", "soft agreement", 10.0, x, y)

    def as_prepared(is_probability: bool) -> SimpleNamespace:
        loaded = SimpleNamespace(output_index=0, output_is_probability=is_probability)
        return SimpleNamespace(loaded=loaded, outputs=lambda m, xs: PreparedModel.outputs(SimpleNamespace(loaded=loaded, chunking=Chunking()), m, xs))

    logits = as_prepared(False)
    reference = probes.score(logits, sharp)
    assert probes.score(logits, sharp, reference) == pytest.approx(100.0)  # the original is the reference
    assert probes.score(logits, flat, reference) < 100.0
    as_probabilities = torch.nn.Sequential(sharp, torch.nn.Softmax(dim=1))
    probabilities = as_prepared(True)
    assert probes.score(probabilities, as_probabilities, probes.score(probabilities, as_probabilities)) == pytest.approx(100.0)
    assert probes.score(probabilities, as_probabilities) == pytest.approx(probes.score(logits, sharp))
    flat_probabilities = torch.nn.Sequential(flat, torch.nn.Softmax(dim=1))
    assert probes.score(probabilities, flat_probabilities, reference) == pytest.approx(probes.score(logits, flat, reference))
