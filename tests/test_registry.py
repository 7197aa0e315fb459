"""The rooms of ``detectors/`` and ``removers/``: a detector in ``detect.DATA_DETECTORS`` runs
beside the margin scan and in every rescan, and the remover registered under the name the
options resolve to is the one ``clean`` runs, its result read through the protocols alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from otbr_onnx import CleanOptions, DataOptions, ScanOptions, clean
from otbr_onnx import detect as detecting
from otbr_onnx.detectors import inversion
from otbr_onnx.errors import UsageError
from otbr_onnx.prepare import prepare
from otbr_onnx import removers
from otbr_onnx.removers import pruning, relearning, unlearning
from tests import builders

QUICK = CleanOptions(scan=ScanOptions(starts=1, steps=3), data=DataOptions(probes=8))
FLAGGED = 1


@dataclass
class ToyDetection:
    """Flags ``FLAGGED`` in the scan and the first rescan, not after."""

    classes: int
    runs: int = 0

    @property
    def suspected(self) -> list[int]:
        return [FLAGGED] if self.runs < 2 else []

    @property
    def anomaly(self) -> np.ndarray:
        return np.eye(self.classes)[FLAGGED] * (2.0 if self.suspected else 0.0)

    @property
    def evidence(self) -> dict[int, list[str]]:
        return {c: ["toy"] for c in self.suspected}

    def cleared(self, target: int) -> bool:
        return target not in self.suspected

    def statistic(self, target: int) -> float:
        return float(self.anomaly[target])

    def as_dict(self) -> dict:
        return {"runs": self.runs, "flagged": self.suspected}


@dataclass(frozen=True)
class ToyDetector:
    name: str = "toy"
    section: str = "toy_test"

    def run(self, prepared, options, images, progress=None) -> ToyDetection:
        return ToyDetection(prepared.num_classes)

    def rerun(self, module, before: ToyDetection, num_classes, output_index, is_probability) -> ToyDetection:
        return ToyDetection(num_classes, before.runs + 1)


def test_the_shipped_registries():
    assert detecting.DATA_DETECTORS == (inversion.DETECTOR,)
    assert removers.choices() == ("auto", "pruning", "adversarial", "relearning")
    assert removers.get("pruning") is pruning.REMOVER and removers.get("adversarial") is unlearning.REMOVER
    assert removers.get("relearning") is relearning.REMOVER
    with pytest.raises(UsageError):
        removers.get("auto")  # a name options resolve, not a remover


def test_a_registered_detector_runs_beside_the_scan_and_in_the_rescan(monkeypatch):
    monkeypatch.setattr(detecting, "DATA_DETECTORS", detecting.DATA_DETECTORS + (ToyDetector(),))
    options = QUICK
    prepared = prepare(builders.build("chain")[1], options)
    found = detecting.detect(prepared, options)
    assert found.suspected == [FLAGGED] and found.evidence == {FLAGGED: ["toy"]}
    assert not found.cleared(FLAGGED)
    report = found.as_dict()
    assert report["evidence"]["toy"] == [FLAGGED] and report["evidence"]["trigger_inversion"] is None
    assert report["toy_test"] == {"runs": 0, "flagged": [FLAGGED]} and report["inversion"] is None
    once = detecting.rescan_prepared(prepared, prepared.module, found, options)
    assert once.part("toy").runs == 1 and not once.cleared(FLAGGED)
    twice = detecting.rescan_prepared(prepared, prepared.module, once, options)
    assert twice.part("toy").runs == 2 and FLAGGED not in twice.suspected


@dataclass
class ToyRemoval:
    """Changes nothing; says so in its own section."""

    rescan: object = None
    weights: dict = field(default_factory=dict)
    strength: float | None = 0.25
    fidelity: tuple[float, str] | None = (99.5, "toy agreement")
    pruned: dict = field(default_factory=dict)

    def verdict(self, detection, options) -> str:
        return "toy removal"

    def as_dict(self) -> dict:
        return {"toy": {"changed_tensors": len(self.weights)}}


@dataclass(frozen=True)
class ToyRemover:
    name: str = "toy"

    def remove(self, prepared, detection, images, options, progress, timer) -> ToyRemoval:
        with timer.stage("toy_removal"):
            return ToyRemoval()


REMOVER = ToyRemover()  # this module, registered as a remover's module in the test below


def test_a_remover_is_one_module_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(removers.MODULES, "toy", __name__)
    result = clean(builders.build("chain")[1], QUICK.with_(removal={"remover": "toy", "always": True}))
    report = result.report
    assert report["verdict"] == "toy removal" and report["toy"] == {"changed_tensors": 0}
    assert report["remover"] == {"name": "toy", "strength": 0.25, "fidelity": 99.5,
                                 "fidelity_metric": "toy agreement"}
    assert "pruning" not in report and "toy_removal" in report["seconds"]
    assert report["recalibration_check"]["run"] is False and report["parity"]["output"]["ok"]
    from otbr_onnx.report import batch_facts
    from otbr_onnx.sarif import clean_results
    assert batch_facts(report)["strength"] == 0.25 and batch_facts(report)["fidelity"] == 99.5
    properties = clean_results(report, "model.onnx")[0]["properties"]
    assert properties["remover"] == "toy" and properties["strength"] == 0.25 and "pruneRatio" not in properties


def test_a_remover_not_registered_is_a_usage_error_before_the_model_is_read(tmp_path):
    """The registry checks the name, not options: a name it lacks stops ``clean`` before the file
    (here one that does not exist) is opened."""
    with pytest.raises(UsageError, match="--remover must be one of auto, pruning, adversarial, relearning, got 'toy'"):
        clean(tmp_path / "absent.onnx", CleanOptions().with_(removal={"remover": "toy"}))


if __name__ == "__main__":
    pytest.main([__file__])
