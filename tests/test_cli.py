"""The command line, end to end, through click's runner."""

import hashlib
from pathlib import Path
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from otbr_onnx.cli import main
from tests.conftest import FAST_ARGS
from tests import builders

FAST = [*FAST_ARGS, "--prune-ratio", "0.2"]


@pytest.fixture()
def preact(tmp_path):
    _, model = builders.build("preact")
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def test_clean_writes_model_and_report(preact, tmp_path):
    out, report = tmp_path / "clean.onnx", tmp_path / "report.json"
    before = preact.read_bytes()
    result = CliRunner().invoke(main, ["clean", str(preact), str(out), "--report", str(report), *FAST])
    assert result.exit_code == 0, result.output
    assert preact.read_bytes() == before
    data = json.loads(report.read_text())
    assert data["input"]["sha256"] == hashlib.sha256(before).hexdigest()
    assert data["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert data["options"]["removal"]["prune_ratio"] == 0.2 and data["options"]["run"]["seed"] == 0
    assert data["pruning"]["pruned_neurons"] > 0 and data["parity"]["output"]["ok"]
    assert set(data["seconds"]) >= {"prepare", "scan", "ranking", "repair", "rescan", "write_back_parity"}
    assert "pruned" in result.stderr and "parity" in result.stderr


def test_reference_switch_records_published_settings(preact, tmp_path):
    out, report = tmp_path / "ref.onnx", tmp_path / "ref.json"
    result = CliRunner().invoke(main, ["clean", str(preact), str(out), "--reference", "--report", str(report),
                                       "--iterations", "2", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    options = json.loads(report.read_text())["options"]
    removal = options["removal"]
    assert removal["reference"] and removal["lr"] == 1e-4 and removal["fusion_lambda"] == 0.5
    assert options["experiment"]["layers"] == "conv" and removal["iterations"] == 2  # explicit options still win
    assert removal["prune_ratio"] == 0.02  # a fixed gamma, as published: no data-free selection


def test_reference_keeps_what_the_published_method_decides_over_the_flags_defaults():
    """``--reference``: the published settings, the options given explicitly on top, and the
    published method's own choices (it always cleans, ranks by NWC) over the flags' defaults."""
    from otbr_onnx.options import CleanOptions, from_command_line

    options = from_command_line(True, {"iterations": 2, "lr": None}, always=False, ranking="auto", seed=7)
    removal, published = options.removal, CleanOptions.published().removal
    assert (removal.always, removal.ranking) == (published.always, published.ranking) == (True, "nwc")
    assert removal.iterations == 2 and removal.lr == published.lr and options.run.seed == 7
    plain = from_command_line(False, {"iterations": None}, always=False, ranking="auto")
    assert plain == CleanOptions()


def test_the_command_line_shows_the_options_defaults():
    """The defaults --help shows are CleanOptions' (the threshold too, which options.py keeps
    beside the detector's so that --help does not import torch)."""
    from otbr_onnx import detect
    from otbr_onnx.options import COMMAND_LINE, DEFAULT_THRESHOLD, CleanOptions

    assert DEFAULT_THRESHOLD == detect.DEFAULT_THRESHOLD == detect.ScanConfig().threshold
    params = {p.name: p for p in main.commands["clean"].params}
    for name in ("scan_starts", "scan_steps", "scan_threshold", "max_classes", "ranking", "method", "remover",
                 "max_acc_drop", "max_disagreement", "probes", "seed", "device", "ort_provider"):
        group, field = COMMAND_LINE[name]
        assert params[name].default == getattr(getattr(CleanOptions(), group), field), name
    shown_range = params["input_range"].type.convert(params["input_range"].default, None, None)
    assert shown_range == CleanOptions().interface.input_range
    assert params["max_nodes"].default == CleanOptions().limits.max_nodes


def test_default_ratio_is_chosen_and_said_on_stderr(preact, tmp_path):
    result = CliRunner().invoke(main, ["clean", str(preact), str(tmp_path / "o.onnx"), *FAST[:-2],
                                       "--probes", "8", "--max-disagreement", "25"])
    assert result.exit_code == 0, result.output
    assert "chosen on 8 synthesised probes" in result.stderr and "25% disagreement" in result.stderr


@pytest.mark.parametrize("args, group, value, words", [
    (["--max-disagreement", "150"], "removal", {"max_disagreement": 150.0},
     "--max-disagreement must be in [0, 100], got 150.0"),
    (["--probes", "0"], "data", {"probes": 0}, "--probes must be >= 1, got 0"),
])
def test_bad_selection_options_are_usage_errors(args, group, value, words, preact, tmp_path):
    """Refused twice over: on the command line by click's range (exit 2, the option named,
    nothing written), and for a library caller, who bypasses click, by ``CleanOptions.validate``,
    which ``clean`` runs before anything else."""
    from otbr_onnx import CleanOptions, clean
    from otbr_onnx.errors import UsageError

    result = CliRunner().invoke(main, ["clean", str(preact), str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2 and args[0] in result.stderr and not (tmp_path / "o.onnx").exists()
    with pytest.raises(UsageError) as refused:
        clean(str(preact), CleanOptions().with_(**{group: value}))
    assert str(refused.value) == words


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("otbr-onnx: error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case, code, words", [
    ("missing", 2, "no such file"),
    ("not_onnx", 2, "not an ONNX model"),
    ("no_weights", 3, "no weight layer"),
])
def test_bad_input_gets_one_line_and_no_output(case, code, words, tmp_path):
    path = tmp_path / "in.onnx"
    if case == "not_onnx":
        path.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    elif case == "no_weights":
        # class scores (N, 16), so that the missing weight layer is the only fault
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["input"], ["r"]), onnx.helper.make_node("Flatten", ["r"], ["logits"])], "g",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
            [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 16])],
        )
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["clean", str(path), str(out), *FAST])
    assert result.exit_code == code
    assert words in _one_error_line(result)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (["in.onnx"] if path.exists() else [])


def test_output_equal_to_input_needs_force(preact):
    result = CliRunner().invoke(main, ["clean", str(preact), str(preact), *FAST])
    assert result.exit_code == 2 and "--force" in _one_error_line(result)


def test_dynamic_spatial_input_needs_input_shape(tmp_path):
    model = builders.export(builders.Chain(), (1, 1, 8, 8))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "S"
    path, out = tmp_path / "dyn.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["clean", str(path), str(out), *FAST])
    assert result.exit_code == 3 and "--input-shape" in _one_error_line(result)
    result = CliRunner().invoke(main, ["clean", str(path), str(out), *FAST, "--input-shape", "1,1,8,8"])
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_eval_reports_acc_and_asr(tmp_path):
    _, model = builders.build("chain")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8), dtype=np.float32)
    pred = builders.logits(model, x).argmax(1)
    data = tmp_path / "d.npz"
    # labels equal to the model's own predictions: ACC 100; triggered set "true" labels != pred
    np.savez(data, x_clean=x, y_clean=pred, x_poisoned=x, y_poisoned=(pred + 1) % 4, target=np.int64(pred[0]))
    result = CliRunner().invoke(main, ["eval", str(path), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["acc"] == 100.0 and metrics["ra"] == 0.0
    keep = (pred + 1) % 4 != pred[0]
    assert metrics["asr"] == pytest.approx(100.0 * np.mean(pred[keep] == pred[0]))


def test_python_dash_m_shows_help():
    done = subprocess.run([sys.executable, "-m", "otbr_onnx", "clean", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--prune-ratio" in done.stdout and "--reference" in done.stdout


def test_a_closed_stdout_ends_the_run_silently_with_141(preact):
    """``otbr-onnx inspect m.onnx | head -1``: the reader leaves after one line. Before, the next
    print raised BrokenPipeError, reported as an internal error (exit 1) with a message."""
    reader_gone = subprocess.Popen([sys.executable, "-m", "otbr_onnx", "inspect", str(preact)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()  # closed before the first print: every write meets a closed pipe
    stderr = reader_gone.stderr.read().decode()
    assert reader_gone.wait(timeout=120) == 141
    assert stderr == ""


def test_inspect_lists_layers_ties_and_verdict(preact):
    result = CliRunner().invoke(main, ["inspect", str(preact), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["verdict"] == "clean would run"
    assert any(set(g) == {"/stem/Conv", "/b1/c2/Conv"} for g in info["tie_groups"].values())
    head = next(layer for layer in info["layers"] if layer["node"] == "/fc/Gemm")
    assert head["head"] and head["role"] == "pinned"


def test_verify_accepts_a_cleaned_model_and_rejects_a_changed_graph(preact, tmp_path):
    out = tmp_path / "clean.onnx"
    assert CliRunner().invoke(main, ["clean", str(preact), str(out), *FAST]).exit_code == 0
    result = CliRunner().invoke(main, ["verify", str(preact), str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    from converters import runtime
    from converters.write_back import changed_initializers

    original, cleaned = onnx.load(preact), onnx.load(out)
    assert report["same_graph"] and set(report["moved"]) == set(changed_initializers(original, cleaned))
    x = runtime.random_inputs((1, 1, 8, 8), 64, 0)  # verify's default --samples, seed 0, inputs in [0, 1)
    top1 = [runtime.run(runtime.session(m), "input", "logits", x).argmax(1) for m in (original, cleaned)]
    agreement = np.mean(top1[0] == top1[1])
    assert report["top1_agreement"] == pytest.approx(agreement)
    same = json.loads(CliRunner().invoke(main, ["verify", str(preact), str(preact), "--json"]).stdout)
    assert same["same_graph"] and same["moved"] == {} and same["top1_agreement"] == 1.0
    tampered = onnx.load(out)
    tampered.graph.node[0].name = "renamed"
    bad = tmp_path / "tampered.onnx"
    onnx.save(tampered, bad)
    result = CliRunner().invoke(main, ["verify", str(preact), str(bad)])
    assert result.exit_code == 5 and "graph.node[0].name" in result.stderr


def test_batch_cleans_a_folder_isolates_failures_and_resumes(tmp_path):
    models = builders.model_folder(tmp_path / "models")
    out = tmp_path / "out"
    args = ["clean", str(models), str(out), *FAST, "--jobs", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2  # the worst model's code: broken.onnx is unreadable
    summary = json.loads((out / "summary.json").read_text())
    status = {Path(o["model"]).name: o["status"] for o in summary["outcomes"]}
    assert status == {"broken.onnx": "failed", "chain.onnx": "cleaned", "preact.onnx": "cleaned"}
    assert (out / "chain.onnx").exists() and (out / "preact.report.json").exists()
    assert not (out / "broken.onnx").exists()
    stamp = (out / "chain.onnx").stat().st_mtime_ns
    (models / "broken.onnx").unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert {o["status"] for o in summary["outcomes"]} == {"skipped"}
    assert (out / "chain.onnx").stat().st_mtime_ns == stamp
    result = CliRunner().invoke(main, [*args[:-2], "--seed", "1"])  # other options: redone
    assert json.loads((out / "summary.json").read_text())["counts"]["cleaned"] == 2


def test_clean_json_prints_the_report_on_stdout(preact, tmp_path):
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["clean", str(preact), str(out), *FAST, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert result.stderr == ""


@pytest.mark.parametrize("ratio_args", [["--prune-ratio", "0.2"], ["--probes", "8"]], ids=["fixed", "chosen"])
def test_report_follows_the_documented_schema(ratio_args, preact, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    root = Path(__file__).resolve().parents[1]
    schema = json.loads((root / "docs" / "report.schema.json").read_text())
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["clean", str(preact), str(tmp_path / "o.onnx"), *FAST[:-2], *ratio_args,
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(report.read_text()), schema)
    assert (json.loads(report.read_text())["ratio_selection"] is None) == (ratio_args[0] == "--prune-ratio")
    broken = json.loads(report.read_text())
    del broken["parity"]["output"]["max_abs"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_a_ratio_over_budget_is_refused_with_one_line_and_no_output(tmp_path):
    _, model = builders.build_trained("preact")
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, path)
    x, _ = builders.quadrant_images(256, seed=3)
    np.savez(tmp_path / "calib.npz", x=x, y=builders.logits(model, x).argmax(1))
    result = CliRunner().invoke(main, ["clean", str(path), str(out), *FAST[:-2], "--calibration",
                                       str(tmp_path / "calib.npz"), "--max-acc-drop", "0"])
    assert result.exit_code == 3
    assert "no prune ratio stays within --max-acc-drop 0" in _one_error_line(result)
    assert not out.exists()


def test_verify_scan_keeps_the_users_limits(preact, monkeypatch):
    """``verify --scan`` scans both models under the ``--max-*`` limits given, not the defaults."""
    import otbr_onnx.pipeline

    seen = []

    def fake_scan(model, options):
        seen.append(options.limits)
        return type("Report", (), {"report": {"scan": {}}})()

    monkeypatch.setattr(otbr_onnx.pipeline, "scan", fake_scan)
    result = CliRunner().invoke(main, ["verify", str(preact), str(preact), "--scan", "--json",
                                       "--max-nodes", "4321", "--max-tensor-elements", "98765432"])
    assert result.exit_code == 0, result.output
    assert [(lim.max_nodes, lim.max_tensor_elements) for lim in seen] == [(4321, 98765432)] * 2


def test_data_without_labels_scores_candidates_by_agreement_with_the_original(tmp_path):
    """``--data`` (no labels): the ratio rule scores each candidate by top-1 agreement with the
    original's answers on the user's images, so the original's own score is 100."""
    _, model = builders.build_trained("preact")
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, path)
    x, _ = builders.quadrant_images(64, seed=4)
    np.savez(tmp_path / "mine.npz", x=x)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["clean", str(path), str(out), *FAST[:-2], "--always", "--remover", "pruning",
                                       "--data", str(tmp_path / "mine.npz"), "--max-acc-drop", "100",
                                       "--report", str(report)])
    written = json.loads(report.read_text())
    assert result.exit_code == (6 if written["final_scan"]["suspected_targets"] else 0), result.output
    selection = written["ratio_selection"]
    assert "user images" in selection["source"] and selection["metric"] == "accuracy"
    assert selection["baseline"] == 100.0 and selection["images"] == 64
    answers = builders.logits(model, x).argmax(1)
    cleaned = builders.logits(onnx.load(out), x).argmax(1)
    chosen = next(t for t in selection["trials"] if t["ratio"] == selection["chosen_ratio"])
    assert chosen["score"] == pytest.approx(100.0 * float(np.mean(cleaned == answers)), abs=1e-6)
