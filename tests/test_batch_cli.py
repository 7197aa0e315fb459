"""Batch mode on the command line: ``scan`` and ``clean`` on a folder print one line per model and a
final table whose facts are the per-model reports'; a progress bar on a terminal only; the choice
of executor and its usage errors. (Ray itself: tests/test_ray.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from otbr_onnx.batch import Outcome, collect_models, run_many, scan_one, SCAN_STATUSES
from otbr_onnx.errors import WRITTEN_CODES
from otbr_onnx.cli import main
from otbr_onnx.executors import on_worker
from tests import builders
from tests.conftest import FAST_ARGS


SCAN_FAST = ["--scan-starts", "2", "--scan-steps", "5"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two tiny classifiers and a file that is no model (it fails with exit 2)."""
    return builders.model_folder(tmp_path_factory.mktemp("models"))


def table(text: str) -> dict[str, dict[str, str]]:
    """The final table printed after the per-model lines: model name -> column -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("batch:") or not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def model_lines(text: str) -> dict[str, str]:
    """The per-model lines: model name -> line."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)\s+(\S+\.onnx)", line)
        if match and match.group(1) != "model":
            found[Path(match.group(2).rstrip(":")).name] = line
    return found


@pytest.mark.parametrize("threshold", ["1e9", "0.5"], ids=["nothing-flagged", "low-threshold"])
def test_batch_scan_lines_and_table_match_the_reports(folder, tmp_path, threshold):
    out = tmp_path / "scans"
    result = CliRunner().invoke(main, ["scan", str(folder), *SCAN_FAST, "--scan-threshold", threshold,
                                       "--out-dir", str(out)])
    reports = {name: json.loads((out / f"{Path(name).stem}.report.json").read_text())
               for name in ("chain.onnx", "preact.onnx")}
    suspected = any(r["scan"]["suspected_targets"] for r in reports.values())
    assert suspected == (threshold == "0.5")  # a threshold of 0.5 flags the top class of a tiny model
    assert result.exit_code == (6 if suspected else 2), result.output  # 6 outranks broken.onnx's 2
    rows, lines = table(result.stdout), model_lines(result.stdout)
    assert set(rows) == set(lines) == {"broken.onnx", "chain.onnx", "preact.onnx"}
    assert list(rows["broken.onnx"].values())[1:4] == ["failed", "-", "-"]
    assert "not an ONNX model" in lines["broken.onnx"]
    for name, report in reports.items():
        targets = report["scan"]["suspected_targets"]
        assert rows[name]["status"] == ("suspected" if targets else "passed")
        assert rows[name]["verdict"] == ("suspected" if targets else "none found")
        assert rows[name]["target"] == (",".join(map(str, targets)) or "-")
        assert rows[name]["time"].endswith("s")
        assert (f"suspected class {','.join(map(str, targets))}" if targets else "none found") in lines[name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and summary["exit_code"] == result.exit_code
    assert list(summary["counts"]) == list(SCAN_STATUSES)


def test_batch_scan_rerun_skips_models_and_keeps_the_verdict_exit_code(folder, tmp_path):
    out = tmp_path / "scans"
    args = ["scan", str(folder / "chain.onnx"), str(folder / "preact.onnx"), *SCAN_FAST, "--scan-threshold", "0.5",
            "--out-dir", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 6, first.output
    stamp = (out / "chain.report.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 6  # a gate rerun gives the same answer
    assert {row["status"] for row in table(again.stdout).values()} == {"skipped"}
    assert table(again.stdout)["chain.onnx"]["target"] == table(first.stdout)["chain.onnx"]["target"]
    assert (out / "chain.report.json").stat().st_mtime_ns == stamp
    edited = json.loads((out / "preact.report.json").read_text())
    edited["scan"] = "edited"  # same input and options key, but not a report any more: scanned again
    (out / "preact.report.json").write_text(json.dumps(edited))
    third = CliRunner().invoke(main, args)
    assert [table(third.stdout)[n]["status"] for n in ("chain.onnx", "preact.onnx")] == ["skipped", "suspected"]


def test_batch_scan_without_out_dir_writes_nothing_and_json_prints_the_summary(folder, tmp_path):
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(main, ["scan", str(folder), *SCAN_FAST, "--scan-threshold", "1e9", "--json"])
    assert result.exit_code == 2
    assert sorted(p.name for p in folder.iterdir()) == before
    summary = json.loads(result.stdout)  # stdout is the JSON alone; lines and table went to stderr
    assert [Path(o["model"]).name for o in summary["outcomes"]] == ["broken.onnx", "chain.onnx", "preact.onnx"]
    assert summary["counts"] == {"passed": 2, "suspected": 0, "skipped": 0, "refused": 0, "failed": 1}
    assert set(table(result.stderr)) == {"broken.onnx", "chain.onnx", "preact.onnx"}


def test_batch_clean_table_shows_strength_and_fidelity_of_the_reports(folder, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["clean", str(folder), str(out), *FAST_ARGS, "--probes", "8"])
    assert result.exit_code == 2, result.output
    rows, lines = table(result.stderr), model_lines(result.stderr)
    for name in ("chain.onnx", "preact.onnx"):
        report = json.loads((out / f"{Path(name).stem}.report.json").read_text())
        selection = report["ratio_selection"]
        chosen = next(t for t in selection["trials"] if t["strength"] == selection["chosen_strength"])
        assert rows[name]["status"] == "cleaned"
        assert rows[name]["verdict"] == "none found"  # FAST: the scan flags nothing, --always cleans
        # the pruning remover's strength is its prune ratio
        assert float(rows[name]["strength"]) == report["remover"]["strength"] == report["pruning"]["ratio"]
        assert rows[name]["fidelity"] == f"{chosen['score']:.1f}%"
        assert f"strength {report['pruning']['ratio']:g}" in lines[name]
        assert f"fidelity {chosen['score']:.1f}%" in lines[name]
    assert rows["broken.onnx"]["status"] == "failed" and rows["broken.onnx"]["strength"] == "-"
    assert "%|" not in result.stderr  # no bar off a terminal


def test_hostile_file_names_are_escaped_in_lines_and_table(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "evil\x1b[2J\u202e.onnx").write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["scan", str(models)])
    assert result.exit_code == 2
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "evil\\x1b[2J\\u202e.onnx" in table(result.stdout)  # the escaped name is the table's key


def test_progress_bar_only_on_a_terminal(folder, tmp_path):
    """Under a pseudo-terminal the bar over models is drawn; the lines and the table are there too."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    primary, secondary = pty.openpty()
    # a fresh pseudo-terminal is 0 x 0, and tqdm draws no bar on a screen of 0 rows
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "otbr_onnx", "scan", str(folder), *SCAN_FAST,
                                "--scan-threshold", "1e9"], stdin=secondary, stdout=secondary, stderr=secondary,
                               env=env, cwd=ROOT)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=120) == 2
    text = b"".join(chunks).decode(errors="replace")
    assert re.search(r"models: +\d+%\|", text), text  # tqdm's bar
    assert "3/3" in text
    assert set(table(text.replace("\r\n", "\n").replace("\r", "\n"))) == {"broken.onnx", "chain.onnx", "preact.onnx"}


@pytest.mark.parametrize("args, words", [
    (["--address", "auto"], "--address needs --executor ray"),
    (["--gpus-per-model", "1"], "--gpus-per-model needs --executor ray"),
    (["--executor", "ray", "--jobs", "2"], "--jobs is for --executor local"),
])
def test_contradictory_executor_options_are_usage_errors(folder, tmp_path, args, words):
    result = CliRunner().invoke(main, ["clean", str(folder), str(tmp_path / "out"), *FAST_ARGS, *args])
    assert result.exit_code == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_ray_executor_without_ray_names_the_extra(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = CliRunner().invoke(main, ["scan", str(folder), "--executor", "ray"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "otbr-onnx: error: --executor ray needs Ray: pip install 'otbr-onnx[ray]'"


def test_an_address_nothing_answers_on_is_refused_at_once(folder, tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["clean", str(folder), str(out), "--executor", "ray", "--address",
                                       f"127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"otbr-onnx: error: --address 127.0.0.1:{port}: no Ray cluster "
                                                  "answers there (Connection refused)"]
    assert not out.exists()  # the run created the folder, and took it back


def test_a_resource_request_no_node_can_hold_is_refused_or_reported(caplog):
    """Ray would keep such a task pending forever: on the instance started for the run, refuse;
    on an existing cluster (an autoscaler may add nodes), warn and wait."""
    from otbr_onnx.errors import UsageError
    from otbr_onnx.executors import check_resources

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    check_resources(nodes, 16, 0, started_here=True)  # fits: nothing said
    assert not caplog.records
    with pytest.raises(UsageError, match=r"--gpus-per-model 1: no Ray node has that many GPUs \(the largest has 0\)"):
        check_resources(nodes, 1, 1, started_here=True)
    with pytest.raises(UsageError, match="--cpus-per-model 32"):
        check_resources(nodes, 32, 0, started_here=True)
    check_resources(nodes, 1, 0.5, started_here=False)
    assert "wait until such a node joins" in caplog.records[-1].getMessage()


def test_ray_executor_is_for_batch_mode(folder, tmp_path):
    result = CliRunner().invoke(main, ["clean", str(folder / "chain.onnx"), str(tmp_path / "o.onnx"), "--executor",
                                       "ray"])
    assert result.exit_code == 2 and "batch mode" in result.stderr


def test_a_worker_that_cannot_see_the_files_fails_that_model_with_the_reason(folder, tmp_path):
    """What a Ray worker on a node without the shared file system, or with another otbr-onnx, answers."""
    from otbr_onnx import __version__
    from otbr_onnx.pipeline import CleanOptions

    missing = on_worker(scan_one, tmp_path / "elsewhere" / "m.onnx", None, CleanOptions(), __version__)
    assert missing.status == "failed" and missing.exit_code == 2
    assert "file system shared by every node" in missing.message
    other = on_worker(scan_one, folder / "chain.onnx", None, CleanOptions(), "0.0.0-other")
    assert other.status == "failed" and "install the same version on every node" in other.message


def test_summary_lists_outcomes_in_input_order_whatever_order_they_finish(folder):
    """An executor may finish models in any order; the summary and the table follow the inputs."""
    from otbr_onnx.pipeline import CleanOptions

    class Reversed:
        def map(self, task, models, out_dir, options):
            for model in reversed(models):
                yield Outcome(str(model), "passed", 0)

    models = collect_models([folder])
    seen = []
    outcomes = run_many(scan_one, models, None, CleanOptions(), SCAN_STATUSES, Reversed(), seen.append)
    assert [o.model for o in seen] == [str(m) for m in reversed(models)]
    assert [o.model for o in outcomes] == [str(m) for m in models]


def test_batch_scan_reruns_a_model_whose_data_changed_at_the_same_path(folder, tmp_path):
    """The resume key holds the --data file's contents: new images at the old path are a new run."""
    import numpy as np

    data, out = tmp_path / "mine.npz", tmp_path / "scans"
    np.savez(data, x=builders.quadrant_images(16, seed=1)[0])
    args = ["scan", str(folder / "chain.onnx"), *SCAN_FAST, "--data", str(data), "--out-dir", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code in WRITTEN_CODES, first.output
    assert table(CliRunner().invoke(main, args).stdout)["chain.onnx"]["status"] == "skipped"
    np.savez(data, x=builders.quadrant_images(16, seed=2)[0])  # same path, other images
    again = CliRunner().invoke(main, args)
    assert table(again.stdout)["chain.onnx"]["status"] in ("passed", "suspected"), again.output


@pytest.mark.parametrize("field", ["path", "calibration"])  # --data, --calibration
def test_resume_key_follows_the_data_files_contents_not_their_path(tmp_path, field):
    from otbr_onnx.batch import options_key
    from otbr_onnx.options import CleanOptions

    def reading(path):
        return CleanOptions().with_(data={field: str(path)})

    first, moved = tmp_path / "a.npz", tmp_path / "b.npz"
    first.write_bytes(b"images one")
    moved.write_bytes(b"images one")
    key = options_key(reading(first))
    assert options_key(reading(moved)) == key  # same contents elsewhere: done
    first.write_bytes(b"images two")
    assert options_key(reading(first)) != key  # new contents, same path: redo
    assert options_key(reading(first), "scan") != options_key(reading(first))


def test_resume_key_follows_every_image_of_a_data_folder(tmp_path):
    from otbr_onnx.batch import options_key
    from otbr_onnx.options import CleanOptions, DataOptions

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(name.encode())
    options = CleanOptions(data=DataOptions(path=str(images)))
    key = options_key(options)
    (images / "notes.txt").write_text("not an image: never read, so no change")
    assert options_key(options) == key
    (images / "b.png").write_bytes(b"another image")
    assert options_key(options) != key
    (images / "b.png").rename(images / "c.png")
    assert len({key, options_key(options)}) == 2


def test_resume_key_without_data_files_is_the_options_hash():
    """Without a data file the key is the hash of the options as they are: nothing is read."""
    import dataclasses
    import hashlib

    from otbr_onnx.batch import options_key
    from otbr_onnx.options import CleanOptions

    plain = json.dumps(dataclasses.asdict(CleanOptions()), sort_keys=True, default=str)
    assert options_key(CleanOptions()) == hashlib.sha256(plain.encode()).hexdigest()
