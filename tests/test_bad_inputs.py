"""Untrusted inputs: every bad model or path gives its documented exit code, one error line,
no output file, no leftover temporary file, and an untouched input.

The cases themselves (and the exit code each must give) live in ``tests/corpus.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from otbr_onnx.errors import UsageError
from otbr_onnx.output import atomic_write
import corpus
from corpus import CASES, ERROR_PREFIX, QUICK_ARGS, Case, run_clean


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, str]:
    """Name -> sha256 (or "dir") of everything in ``folder``; empty if the folder is absent."""
    if not folder.is_dir():
        return {}
    return {p.name: ("dir" if p.is_dir() else _digest(p)) for p in folder.iterdir()}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_is_refused_cleanly(case: Case, tmp_path: Path) -> None:
    prepared = case.build(tmp_path)
    if prepared.skip:
        pytest.skip(prepared.skip)
    guarded = {path: _digest(path) for path in prepared.guarded}
    out_folder = prepared.output.parent
    folder_before = _listing(out_folder)
    output_existed = prepared.output.exists()

    with prepared.during():
        outcome = run_clean(prepared.model, prepared.output, *prepared.args)

    assert outcome.exception is None, f"{case.name}: {outcome.exception!r}"
    assert outcome.exit_code == case.exit_code, f"{case.name}: stderr {outcome.stderr!r}"
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, f"{case.name}: stderr has {len(lines)} lines: {outcome.stderr!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in outcome.stderr
    assert case.message in lines[0], f"{case.name}: refused for another reason: {lines[0]}"
    assert outcome.stdout == ""
    # Nothing written: no new output, no temporary file, old files (input, a previous output) intact.
    if not output_existed:
        assert not prepared.output.exists()
    assert _listing(out_folder) == folder_before
    for path, digest in guarded.items():
        assert _digest(path) == digest, f"{case.name}: {path} changed"


def test_case_names_are_unique_and_codes_documented() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    assert {case.exit_code for case in CASES} <= {2, 3, 4}


def test_the_untouched_tiny_model_cleans(tmp_path: Path) -> None:
    # The control: every refusal above comes from the injected fault, not from a broken base.
    model = tmp_path / "model.onnx"
    model.write_bytes(corpus.tiny_bytes())
    output = tmp_path / "cleaned.onnx"
    outcome = run_clean(model, output, *QUICK_ARGS)
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stderr == ""
    session = ort.InferenceSession(output.read_bytes(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": corpus.parity_probe()})[0]
    assert logits.shape == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cleaned.onnx", "model.onnx"]


def test_output_is_input_is_allowed_with_force(tmp_path: Path) -> None:
    # The refusal above is about consent, not ability: with --force the input is replaced.
    model = tmp_path / "model.onnx"
    model.write_bytes(corpus.tiny_bytes())
    outcome = run_clean(model, model, *QUICK_ARGS, "--force")
    assert outcome.exit_code == 0, outcome.stderr
    ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# ---------------------------------------------------------------------------------------------
# atomic_write on its own: a failure at any step leaves the target as it was and no temp file
# ---------------------------------------------------------------------------------------------


def _enospc(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("step", ["fsync", "replace"])
@pytest.mark.parametrize("existing", [None, b"old contents"])
def test_atomic_write_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, existing: bytes | None
) -> None:
    target = tmp_path / "cleaned.onnx"
    if existing is not None:
        target.write_bytes(existing)
    monkeypatch.setattr(f"otbr_onnx.output.os.{step}", _enospc)
    with pytest.raises(UsageError) as raised:
        atomic_write(target, b"new contents" * 1000)
    assert raised.value.exit_code == 2
    assert "No space left" in str(raised.value)
    expected = [] if existing is None else ["cleaned.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    if existing is not None:
        assert target.read_bytes() == existing


def test_atomic_write_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C during the write is not an OSError: it must still clean up, then propagate.
    def interrupt(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("otbr_onnx.output.os.fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "cleaned.onnx", b"data")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the real process: stderr at the file-descriptor level (warnings, native logs) is one line too
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ["random_bytes", "nan_weight"])
def test_real_process_prints_one_line(case_name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == case_name)
    prepared = case.build(tmp_path)
    command = [sys.executable, "-m", "otbr_onnx", "clean", str(prepared.model), str(prepared.output),
               *prepared.args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == case.exit_code, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(ERROR_PREFIX)
    assert not prepared.output.exists()
