"""Batch mode on Ray (``--executor ray``), on a local Ray instance the module starts once: the same
per-model files, summary, exit code and resumability as the local executor; a crashed worker fails
its model only; Ctrl-C cancels the tasks and exits 130 with nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from otbr_onnx.batch import SCAN_STATUSES, collect_models, run_many
from otbr_onnx.cli import main
from otbr_onnx.executors import RayExecutor
from tests import builders
from tests.conftest import FAST_ARGS

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
CPUS = 2


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (its start costs seconds); the CLI, finding this process
    connected already, uses it and leaves it running."""
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture()
def folder(tmp_path) -> Path:
    return builders.model_folder(tmp_path / "models")


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _facts(summary: dict, out: Path) -> list[tuple]:
    """What must not depend on the executor (times do; fidelity scores may differ in the last bits),
    with the output folder written as OUT."""
    return [(o["model"], o["status"], o["exit_code"], o["message"], (o["output"] or "").replace(str(out), "OUT"),
             o["verdict"], tuple(o["targets"]), o["strength"]) for o in summary["outcomes"]]


def test_ray_batch_matches_the_local_one_and_resumes(cluster, folder, tmp_path):
    args = [*FAST_ARGS, "--probes", "8"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    on_ray = CliRunner().invoke(main, ["clean", str(folder), str(remote), *args, "--executor", "ray",
                                       "--cpus-per-model", "1"])
    assert on_ray.exit_code == 2, on_ray.output  # the worst model's: broken.onnx is unreadable
    here = CliRunner().invoke(main, ["clean", str(folder), str(local), *args])
    assert here.exit_code == 2
    ray_summary, local_summary = _summary(remote), _summary(local)
    assert ray_summary.keys() == local_summary.keys() and ray_summary["counts"] == local_summary["counts"]
    assert [o.keys() for o in ray_summary["outcomes"]] == [o.keys() for o in local_summary["outcomes"]]
    assert _facts(ray_summary, remote) == _facts(local_summary, local)
    assert [o["status"] for o in ray_summary["outcomes"]] == ["failed", "cleaned", "cleaned"]
    for name in ("chain", "preact"):  # the same per-model files
        report = json.loads((remote / f"{name}.report.json").read_text())
        assert report["output"]["sha256"] == hashlib.sha256((remote / f"{name}.onnx").read_bytes()).hexdigest()
        assert report["options_key"] == json.loads((local / f"{name}.report.json").read_text())["options_key"]
    assert not (remote / "broken.onnx").exists()
    assert "cleaned   " in on_ray.stderr and "model " in on_ray.stderr  # the lines and the table

    stamp = (remote / "chain.onnx").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["clean", str(folder), str(remote), *args, "--executor", "ray"])
    assert again.exit_code == 2
    assert [o["status"] for o in _summary(remote)["outcomes"]] == ["failed", "skipped", "skipped"]
    assert (remote / "chain.onnx").stat().st_mtime_ns == stamp


def test_ray_batch_scan_has_the_local_statuses(cluster, folder, tmp_path):
    args = ["--scan-starts", "2", "--scan-steps", "5", "--scan-threshold", "0.5"]
    on_ray = CliRunner().invoke(main, ["scan", str(folder), *args, "--executor", "ray", "--out-dir", str(tmp_path / "r")])
    here = CliRunner().invoke(main, ["scan", str(folder), *args, "--out-dir", str(tmp_path / "l")])
    assert on_ray.exit_code == here.exit_code == 6  # threshold 0.5: a tiny model's top class is flagged
    assert ([o["status"] for o in _summary(tmp_path / "r")["outcomes"]]
            == [o["status"] for o in _summary(tmp_path / "l")["outcomes"]])


def test_a_crashed_worker_fails_its_model_and_the_sweep_goes_on(cluster, folder):
    (folder / "crash.onnx").write_bytes((folder / "chain.onnx").read_bytes())

    def crashing(model, out_dir, options):  # defined here: Ray ships a local function by value
        import os

        if model.stem == "crash":
            os._exit(1)  # the worker process dies, as in a segfault or the kernel's OOM killer
        from otbr_onnx.batch import scan_one

        return scan_one(model, out_dir, options)

    from otbr_onnx.pipeline import CleanOptions, ScanOptions

    options = CleanOptions(scan=ScanOptions(starts=2, steps=5, threshold=1e9))
    outcomes = run_many(crashing, collect_models([folder]), None, options, SCAN_STATUSES, RayExecutor())
    status = {Path(o.model).name: (o.status, o.exit_code) for o in outcomes}
    assert status == {"broken.onnx": ("failed", 2), "chain.onnx": ("passed", 0), "crash.onnx": ("failed", 1),
                      "preact.onnx": ("passed", 0)}
    crashed = next(o for o in outcomes if o.model.endswith("crash.onnx"))
    assert crashed.message.startswith("Ray task failed:") and "\n" not in crashed.message


def test_ctrl_c_cancels_the_tasks_and_exits_130_with_nothing_half_written(cluster, tmp_path):
    """A second driver (the CLI, in its own process) on the module's cluster via --address; Ctrl-C
    while its task runs: exit 130, one line, no summary, no temporary file, the CPUs free again."""
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(builders.build("preact")[1], models / "preact.onnx")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "otbr_onnx", "clean", str(models), str(out), "--always", "--ranking", "nwc",
               "--iterations", "100000", "--lr", "1e-9", "--prune-ratio", "0.2", "--executor", "ray", "--address", cluster]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        assert _wait_for(lambda: ray.available_resources().get("CPU", 0) < CPUS, 90), "the task never started"
        time.sleep(1.0)  # inside the task: importing torch or unlearning
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
        _, stderr = process.communicate(timeout=180)  # cancel (<= 35 s) and disconnect (<= 20 s) are bounded
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "otbr-onnx: error: interrupted (Ctrl-C); no partial output was written"
    assert "Traceback" not in stderr
    assert not (out / "summary.json").exists() and not list(out.glob(".*.tmp"))
    assert not (out / "preact.onnx").exists()
    assert _wait_for(lambda: ray.available_resources().get("CPU", 0) == CPUS, 30), "a task still holds a CPU"


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False
