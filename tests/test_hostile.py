"""Hostile inputs, round two (issue 13), class by class, in process through click's runner.

Each class has several cases of its own; ``tests/test_hostile_runner.py`` runs one of each as a
real process and records what a user would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import corpus
import hostile_files as hf
from otbr_onnx.cli import main
from otbr_onnx.errors import EXIT_SUSPECTED, UnsupportedModelError, UsageError, one_line, printable
from otbr_onnx.evaluate import load_npz, split_sets
from otbr_onnx.layers import find_weight_layers, reachable_layers
from otbr_onnx.load import Limits, load_model
from otbr_onnx.verify import verify

QUICK = list(corpus.QUICK_ARGS)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result, code: int) -> str:
    """The single stderr line of a refusal with ``code``; no traceback, no raw escape."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("otbr-onnx: error: "), result.stderr
    assert "Traceback" not in result.output and not hf.has_raw_control(result.stderr + result.stdout)
    return lines[0]


def model_file(folder: Path, model=None, name: str = "model.onnx") -> Path:
    return hf.save(model if model is not None else corpus.tiny_model(), folder / name)


def models_dir(folder: Path, names=("a", "b")) -> Path:
    models = folder / "models"
    models.mkdir()
    for name in names:
        model_file(models, name=f"{name}.onnx")
    return models


def digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# 1. batch output overlapping the input ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["same", "inside", "input_inside_output", "relative_same", "file_in_output"])
def test_batch_output_overlapping_input_is_refused(layout: str, tmp_path: Path, monkeypatch) -> None:
    models = models_dir(tmp_path)
    before = digests(models)
    args = {
        "same": [models, models],
        "inside": [models, models / "cleaned"],
        "input_inside_output": [models, tmp_path],
        "relative_same": ["models", "./models/../models"],
        "file_in_output": [models / "a.onnx", models / "b.onnx", models],
    }[layout]
    monkeypatch.chdir(tmp_path)
    line = one_error(invoke("clean", *args, *QUICK), 2)
    assert "overlaps the inputs" in line and "--force" in line
    assert digests(models) == before and sorted(p.name for p in models.iterdir()) == ["a.onnx", "b.onnx"]


def test_batch_input_linked_to_an_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    real = model_file(out, name="a.onnx")
    data = real.read_bytes()
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.onnx").symlink_to(real)
    assert "overlaps the inputs" in one_error(invoke("clean", models, out, *QUICK), 2)
    assert real.read_bytes() == data


def test_batch_output_linked_into_input_is_refused(tmp_path: Path) -> None:
    models = models_dir(tmp_path)
    (tmp_path / "out").symlink_to(models)
    assert "overlaps the inputs" in one_error(invoke("clean", models, tmp_path / "out", *QUICK), 2)


def written_code(report: Path) -> int:
    """What ``clean`` exits with once it has written: 6 when the fresh scan of the written model
    (the report's ``final_scan``) flags a class, else 0."""
    flagged = (json.loads(report.read_text()).get("final_scan") or {}).get("suspected_targets")
    return EXIT_SUSPECTED if flagged else 0


def test_batch_in_place_needs_force_and_then_works(tmp_path: Path) -> None:
    models = models_dir(tmp_path, names=("a",))
    before = (models / "a.onnx").read_bytes()
    result = invoke("clean", models, models, *QUICK, "--force")
    assert result.exit_code == written_code(models / "a.report.json"), result.stderr
    assert (models / "a.onnx").read_bytes() != before  # replaced by the cleaned model, as asked
    onnx.checker.check_model(onnx.load(models / "a.onnx"))


def test_batch_into_a_separate_folder_still_works(tmp_path: Path) -> None:
    models = models_dir(tmp_path, names=("a",))
    result = invoke("clean", models, tmp_path / "out", *QUICK)
    assert result.exit_code == written_code(tmp_path / "out" / "a.report.json"), result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.onnx", "a.report.json", "summary.json"]


# 2. terminal injection -------------------------------------------------------------------------------


def test_printable_escapes_what_a_terminal_acts_on() -> None:
    assert printable("plain é 層 name") == "plain é 層 name"
    assert printable("a\x1b]0;t\x07b") == "a\\x1b]0;t\\x07b"
    assert printable("\x9b2J\u202e\u2028") == "\\x9b2J\\u202e\\u2028"
    assert printable("line\nnext", keep="\n") == "line\nnext"
    assert printable("\udcff") == "\\udcff"  # a file name that is not UTF-8 (surrogate escape)
    assert one_line(ValueError(f"x\n{hf.ESCAPES}")) .startswith("x \\x1b]0;pwned\\x07")


def test_library_errors_never_carry_raw_escapes() -> None:
    error = UnsupportedModelError(f"domain {hf.ESCAPES}")
    assert not hf.has_raw_control(str(error)) and "\\x1b" in str(error)


@pytest.mark.parametrize("make, code, shown", [
    (hf.escape_in_domain, 3, "com.evil\\x1b]0;pwned\\x07"),
    (hf.escape_in_attribute_name, 2, "alpha\\x1b]0;pwned"),
    (hf.escape_in_external_location, 2, "w\\x1b]0;pwned"),
])
def test_escapes_in_the_model_are_shown_escaped(make, code, shown: str, tmp_path: Path) -> None:
    path = model_file(tmp_path, make())
    for command in (["clean", path, tmp_path / "out.onnx", *QUICK], ["inspect", path], ["verify", path, path]):
        line = one_error(invoke(*command), code)
        assert shown in line, line


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_escapes_producer_name_and_version(as_json: bool, tmp_path: Path) -> None:
    path = model_file(tmp_path, hf.escape_in_producer())
    result = invoke("inspect", path, *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.stderr
    assert not hf.has_raw_control(result.stdout)
    if as_json:  # JSON writes every control character as \uXXXX; the value is still the real one
        assert json.loads(result.stdout)["producer"].startswith(f"exporter{hf.ESCAPES}")
    else:
        assert "exporter\\x1b]0;pwned\\x07" in result.stdout


def test_batch_file_names_are_escaped_on_stderr_and_in_the_summary(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / f"m{hf.ESCAPES}.onnx").write_bytes(b"not a model")
    result = invoke("clean", models, tmp_path / "out", *QUICK[:-1])
    assert result.exit_code == 2
    assert not hf.has_raw_control(result.stderr) and "m\\x1b]0;pwned" in result.stderr
    summary = (tmp_path / "out" / "summary.json").read_bytes()
    assert b"\x1b" not in summary and not hf.has_raw_control(summary.decode())


def test_escaped_path_on_the_command_line_is_escaped(tmp_path: Path) -> None:
    line = one_error(invoke("clean", tmp_path / f"x{hf.ESCAPES}.onnx", tmp_path / "o.onnx"), 2)
    assert "x\\x1b]0;pwned" in line


def test_verbose_logging_escapes(tmp_path: Path) -> None:
    import logging

    from otbr_onnx.cli import _PrintableFormatter

    record = logging.LogRecord("otbr_onnx", logging.INFO, __file__, 1, "layer %s", (hf.ESCAPES,), None)
    assert not hf.has_raw_control(_PrintableFormatter("%(message)s").format(record))


# 3. FIFOs and other non-regular inputs -------------------------------------------------------------


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", ["eval_data", "eval_poisoned", "clean_calibration", "clean_model", "inspect",
                                     "verify", "eval_original"])
def test_fifo_inputs_are_refused_without_blocking(command: str, tmp_path: Path) -> None:
    model = model_file(tmp_path)
    data = hf.write_npz(tmp_path / "data.npz", x=hf.images(), y=hf.labels())
    pipe = fifo(tmp_path / "pipe")
    args = {
        "eval_data": ["eval", model, "--data", pipe],
        "eval_poisoned": ["eval", model, "--data", data, "--poisoned", pipe],
        "eval_original": ["eval", model, "--data", data, "--original", pipe],
        "clean_calibration": ["clean", model, tmp_path / "o.onnx", "--calibration", pipe, *QUICK],
        "clean_model": ["clean", pipe, tmp_path / "o.onnx", *QUICK],
        "inspect": ["inspect", pipe],
        "verify": ["verify", model, pipe],
    }[command]
    start = time.monotonic()
    assert "not a regular file" in one_error(invoke(*args), 2)
    assert time.monotonic() - start < 30 and not (tmp_path / "o.onnx").exists()


def test_device_files_are_refused(tmp_path: Path) -> None:
    assert "not a regular file" in one_error(invoke("inspect", "/dev/zero"), 2)
    with pytest.raises(UsageError, match="not a regular file"):
        load_npz("/dev/zero")


# 4. npz files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(hf.npz_cases()))
def test_bad_eval_npz_is_a_usage_error_naming_the_field(name: str, tmp_path: Path) -> None:
    arrays, fragment = hf.npz_cases()[name]
    data = hf.write_npz(tmp_path / "data.npz", **arrays)
    line = one_error(invoke("eval", model_file(tmp_path), "--data", data), 2)
    assert fragment in line, line


@pytest.mark.parametrize("make, fragment", [
    (lambda p: hf.npz_huge_header(p), "array 'x' declares shape (10000000, 1, 8, 8)"),
    (lambda p: hf.npz_huge_header(p, compress=True), "array 'x' declares"),
    (lambda p: hf.npz_huge_header(p, shape=(2**62,)), "array 'x' declares"),
    (lambda p: hf.write_npz_members(p, {"x": hf.npy_with_header({"descr": "|O", "fortran_order": False,
                                                                  "shape": (6,)})}), "dtype object"),
    (lambda p: hf.write_npz_members(p, {"x": b"\x93NUMPY\x09\x09garbage"}), "not a readable .npy array"),
    (lambda p: hf.write_npz_members(p, {}), "holds no arrays"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "not a zip archive"),
    (lambda p: p.write_bytes(b""), "not a zip archive"),
])
def test_lying_npz_headers_are_refused_before_allocating(make, fragment: str, tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    make(data)
    line = one_error(invoke("eval", model_file(tmp_path), "--data", data), 2)
    assert fragment in line, line


def test_npz_declared_bytes_are_capped_by_the_limit_flag(tmp_path: Path) -> None:
    data = hf.npz_zip_bomb(tmp_path / "data.npz")  # honest, compressed: 10 MB of zeros in a few KB
    line = one_error(invoke("eval", model_file(tmp_path), "--data", data, "--max-file-bytes", "1000000"), 2)
    assert "--max-file-bytes limit of 1000000" in line
    arrays = load_npz(data)  # within the default limit it reads
    assert arrays["x"].shape == (40_000, 1, 8, 8)


def test_calibration_npz_is_checked_before_any_work(tmp_path: Path) -> None:
    data = hf.write_npz(tmp_path / "cal.npz", x=hf.images(), y=hf.labels().astype(np.float32) + 0.25)
    line = one_error(invoke("clean", model_file(tmp_path), tmp_path / "o.onnx", "--calibration", data, *QUICK), 2)
    assert "--calibration" in line and "array 'y'" in line


def test_good_npz_still_evaluates(tmp_path: Path) -> None:
    data = hf.write_npz(tmp_path / "d.npz", x_clean=hf.images(), y_clean=hf.labels(),
                        x_poisoned=hf.images(), y_poisoned=hf.labels(), target=np.array(1))
    result = invoke("eval", model_file(tmp_path), "--data", data, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metrics"]["clean_samples"] == 6
    (x, y), poisoned = split_sets(load_npz(data), None)
    assert x.dtype == np.float32 and y.dtype == np.int64 and poisoned is not None


def test_eval_on_a_non_classifier_is_refused(tmp_path: Path) -> None:
    data = hf.write_npz(tmp_path / "d.npz", x=hf.images(), y=hf.labels())
    line = one_error(invoke("eval", model_file(tmp_path, hf.segmentation_output()), "--data", data), 3)
    assert "expected class scores of shape (N, classes)" in line


# 5. every loader error is a refusal --------------------------------------------------------------


def test_hard_linked_external_data_is_refused(tmp_path: Path) -> None:
    prepared = corpus.external_valid(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}_outside.bin"
    os.link(tmp_path / "weights.bin", outside)
    try:
        line = one_error(invoke("clean", prepared.model, prepared.output, *QUICK), 3)
    finally:
        outside.unlink()
    assert "hard links" in line


def test_onnx_validation_error_from_external_loading_is_mapped(tmp_path: Path, monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise onnx.checker.ValidationError("Path of external data is a hard link")

    monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model", refuse)
    prepared = corpus.external_valid(tmp_path)
    assert "onnx refuses the external data" in one_error(invoke("inspect", prepared.model), 3)


@pytest.mark.parametrize("failure, code", [(RecursionError("nested"), 2), (MemoryError(), 3), (KeyError("k"), 2),
                                           (AttributeError("a"), 2)])
def test_unexpected_library_errors_while_loading_are_refusals(failure, code: int, tmp_path: Path,
                                                               monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr("otbr_onnx.load.checks.check_constants", broken)
    line = one_error(invoke("inspect", model_file(tmp_path)), code)
    assert "internal error" not in line


# 6. layers that do not reach the output ------------------------------------------------------------


def test_dead_layers_are_skipped_and_reported(tmp_path: Path) -> None:
    model = hf.dead_conv_beside_live_head()
    layers, skipped = find_weight_layers(model)
    kept, skipped = reachable_layers(model, layers, skipped, "logits")
    assert [layer.node_name for layer in kept] == ["conv", "fc"]
    assert [(s.node_name, s.reason) for s in skipped] == [("dead_conv", "its output does not reach the output 'logits'")]
    report = tmp_path / "r.json"
    result = invoke("clean", model_file(tmp_path, model), tmp_path / "o.onnx", *QUICK, "--report", report)
    assert result.exit_code == written_code(report), result.stderr
    assert {"node_name": "dead_conv", "op_type": "Conv", "reason": "its output does not reach the output 'logits'"} \
        in json.loads(report.read_text())["skipped_layers"]
    info = json.loads(invoke("inspect", tmp_path / "model.onnx", "--json").stdout)
    assert info["verdict"] == "clean would run" and info["skipped_layers"][-1]["node"] == "dead_conv"


@pytest.mark.parametrize("make", [hf.dead_conv_only, hf.dead_conv_through_shape])
def test_nothing_reaching_the_output_is_refused(make, tmp_path: Path) -> None:
    path = model_file(tmp_path, make())
    assert "nothing to clean" in one_error(invoke("clean", path, tmp_path / "o.onnx", *QUICK), 3)
    assert "nothing to clean" in json.loads(invoke("inspect", path, "--json").stdout)["verdict"]


def test_a_layer_reaching_only_another_output_is_dead_for_that_output() -> None:
    model = hf.dead_conv_beside_live_head()
    model.graph.output.append(onnx.helper.make_tensor_value_info("dead_out", onnx.TensorProto.FLOAT, None))
    layers, skipped = find_weight_layers(model)
    assert len(reachable_layers(model, layers, skipped)[0]) == 3  # any output
    assert len(reachable_layers(model, layers, skipped, "logits")[0]) == 2


# 7. Ctrl-C -------------------------------------------------------------------------------------------


def _interrupt(args: list[str], after: float, cwd: Path) -> subprocess.CompletedProcess:
    process = subprocess.Popen([sys.executable, "-m", "otbr_onnx", *map(str, args)], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_ctrl_c_at_start_up_is_one_line_and_130(after: float, tmp_path: Path) -> None:
    done = _interrupt(["clean", model_file(tmp_path), tmp_path / "o.onnx", *QUICK, "--iterations", "100000",
                       "--lr", "1e-9"], after, tmp_path)
    if done.returncode == 0:
        pytest.skip("the run finished before the signal")  # a very fast machine
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == ["otbr-onnx: error: interrupted (Ctrl-C); no partial output was written"]
    assert not (tmp_path / "o.onnx").exists()


def test_ctrl_c_reaches_click_as_130_not_aborted(monkeypatch, tmp_path: Path) -> None:
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("otbr_onnx.cli._Shape.convert", interrupted)  # while click parses --input-shape
    result = CliRunner().invoke(main, ["inspect", str(model_file(tmp_path)), "--input-shape", "1,1,8,8"])
    assert result.exit_code == 130 and "Aborted" not in result.output


def test_click_usage_errors_are_one_line(tmp_path: Path) -> None:
    for args in (["clean", "--probes", "0", "a", "b"], ["clean"], ["inspect", "m", "--no-such-flag"],
                 ["eval", "m", "--data", str(tmp_path / "missing.npz")]):
        assert one_error(CliRunner().invoke(main, args), 2)


# 8. verify -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before, after, where", [
    (hf.with_class_order([0, 1, 2]), hf.with_class_order([2, 1, 0]), "class_order"),
    (hf.with_class_order([0, 1, 2], np.int32), hf.with_class_order([1, 0, 2], np.int32), "class_order"),
    (hf.with_scale(1.0), hf.with_scale(-1.0), "logit_scale"),
])
def test_verify_reports_non_weight_initializer_changes(before, after, where: str, tmp_path: Path) -> None:
    a, b = model_file(tmp_path, before, "a.onnx"), model_file(tmp_path, after, "b.onnx")
    result = invoke("verify", a, b)
    assert result.exit_code == 5 and where in result.stderr and result.stdout == ""
    assert not json.loads(invoke("verify", a, b, "--json").stdout)["same_graph"]


def test_verify_counts_every_changed_weight(tmp_path: Path) -> None:
    original = corpus.tiny_model()
    changed = hf.with_changed_weight(hf.with_changed_weight(original, "conv_w"), "fc_b")
    loaded = load_model(model_file(tmp_path, original))
    result = verify(original, changed, loaded.input_name, loaded.input_shape, samples=4)
    assert result.same_graph and set(result.moved) == {"conv_w", "fc_b"}
    shown = invoke("verify", tmp_path / "model.onnx", model_file(tmp_path, changed, "c.onnx"))
    assert shown.exit_code == 0 and "(2 tensors changed)" in shown.stdout


# 9. memory bombs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [hf.bomb_constant_of_shape, hf.bomb_expand, hf.bomb_tile, hf.bomb_from_constant_node])
def test_memory_bombs_are_refused_from_shapes(make, tmp_path: Path) -> None:
    path = model_file(tmp_path, make())
    line = one_error(invoke("clean", path, tmp_path / "o.onnx", *QUICK), 3)
    assert "'big' would hold 256000000 elements" in line and "--max-tensor-elements" in line


def test_tensor_limit_is_a_flag(tmp_path: Path) -> None:
    path = model_file(tmp_path, hf.bomb_constant_of_shape(100))  # 10000 elements: harmless
    assert invoke("inspect", path).exit_code == 0
    assert "limit of 5000" in one_error(invoke("inspect", path, "--max-tensor-elements", "5000"), 3)


@pytest.mark.parametrize("flag, value, fragment", [
    ("--max-file-bytes", "100", "--max-file-bytes limit of 100"),
    ("--max-nodes", "2", "--max-nodes limit of 2"),
    ("--max-noise-elements", "10", "--max-noise-elements limit of 10"),
])
def test_limit_flags_named_in_messages_exist(flag: str, value: str, fragment: str, tmp_path: Path) -> None:
    path = model_file(tmp_path)
    for command in (["clean", path, tmp_path / "o.onnx", *QUICK], ["inspect", path]):
        line = one_error(invoke(*command, flag, value), 3)
        assert fragment in line, line


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_limit_flags_are_validated_by_click(value: str, tmp_path: Path) -> None:
    line = one_error(invoke("inspect", model_file(tmp_path), "--max-nodes", value), 2)
    assert "--max-nodes" in line


def test_limits_reach_the_library() -> None:
    with pytest.raises(UnsupportedModelError, match="--max-nodes limit of 3"):
        from otbr_onnx.load import load_proto

        load_proto(corpus.tiny_model(), limits=Limits(max_nodes=3))


# 10. inspect and clean agree --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [hf.segmentation_output, hf.dead_conv_only, hf.bomb_constant_of_shape])
def test_inspect_refuses_what_clean_refuses(make, tmp_path: Path) -> None:
    path = model_file(tmp_path, make())
    clean = invoke("clean", path, tmp_path / "o.onnx", *QUICK)
    assert clean.exit_code == 3
    inspect = invoke("inspect", path, "--json")
    verdict = json.loads(inspect.stdout)["verdict"] if inspect.exit_code == 0 else inspect.stderr
    assert "clean would run" not in verdict


def test_inspect_checks_the_noise_budget_of_clean(tmp_path: Path) -> None:
    path = model_file(tmp_path)  # 64 elements per image, 256 images: 16384 elements
    info = json.loads(invoke("inspect", path, "--json", "--max-noise-elements", "10000").stdout)
    assert "--max-noise-elements" in info["verdict"]
    assert "--max-noise-elements" in one_error(invoke("clean", path, tmp_path / "o.onnx", "--batch-size", "256",
                                                      "--max-noise-elements", "10000"), 3)


# 11. non-regular outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["output", "report"])
def test_fifo_output_is_refused(which: str, tmp_path: Path) -> None:
    model = model_file(tmp_path)
    pipe = fifo(tmp_path / "pipe")
    out = pipe if which == "output" else tmp_path / "o.onnx"
    extra = ["--report", pipe] if which == "report" else []
    assert "not a regular file" in one_error(invoke("clean", model, out, *QUICK, *extra), 2)
    assert pipe.is_fifo() and not (tmp_path / "o.onnx").exists()


def test_fifo_among_batch_outputs_is_refused(tmp_path: Path) -> None:
    models = models_dir(tmp_path)
    (tmp_path / "out").mkdir()
    fifo(tmp_path / "out" / "b.report.json")
    assert "not a regular file" in one_error(invoke("clean", models, tmp_path / "out", *QUICK), 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.report.json"]


def test_atomic_write_refuses_a_fifo(tmp_path: Path) -> None:
    from otbr_onnx.output import atomic_write

    with pytest.raises(UsageError, match="not a regular file"):
        atomic_write(fifo(tmp_path / "pipe"), b"data")
