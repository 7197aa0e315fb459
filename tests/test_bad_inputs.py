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

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from otbr_onnx.errors import WRITTEN_CODES as WRITTEN, UsageError
from otbr_onnx.output import atomic_write
import corpus
from corpus import CASES, ERROR_PREFIX, QUICK_ARGS, Case, run_clean

# clean wrote its output: 0, or 6 where a fresh scan of the written model flags a class


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _exists(path: Path) -> bool:
    """Path.exists, but a name the OS refuses to look up (too long) simply does not exist."""
    try:
        return path.exists()
    except OSError:
        return False


def _listing(folder: Path) -> dict[str, str]:
    """Name -> sha256 (or "dir") of everything in ``folder``; empty if the folder is absent."""
    if not folder.is_dir():
        return {}
    return {p.name: ("dir" if p.is_dir() else _digest(p)) for p in folder.iterdir()}


def _params() -> list:
    params = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.known_bug)] if case.known_bug else []
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_refused_cleanly(case: Case, tmp_path: Path) -> None:
    prepared = case.build(tmp_path)
    if prepared.skip:
        pytest.skip(prepared.skip)
    guarded = {path: _digest(path) for path in prepared.guarded}
    out_folder = prepared.output.parent
    folder_before = _listing(out_folder)
    output_existed = _exists(prepared.output)

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
        assert not _exists(prepared.output)
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
    assert outcome.exit_code in WRITTEN, outcome.stderr
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
    assert outcome.exit_code in WRITTEN, outcome.stderr
    ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# ---------------------------------------------------------------------------------------------
# atomic_write on its own: a failure at any step leaves the target as it was and no temp file
# ---------------------------------------------------------------------------------------------


def _enospc(*_args: object, **_kwargs: object) -> None:
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


@pytest.mark.parametrize("case_name", ["random_bytes", "nan_weight", "input_channel_mismatch"])
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


# ---------------------------------------------------------------------------------------------
# the checks must not refuse what is legitimate
# ---------------------------------------------------------------------------------------------


def _clip_with_infinite_bound() -> onnx.ModelProto:
    """The tiny model with Clip(relu_out, 0, +inf) after the Relu: an infinite bound, not a weight."""
    model = corpus.tiny_model()
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(0.0, np.float32), "clip_min"),
        numpy_helper.from_array(np.array(np.inf, np.float32), "clip_max"),
    ])
    pool = next(n for n in model.graph.node if n.name == "pool")
    pool.input[0] = "clipped"
    clip = helper.make_node("Clip", ["relu_out", "clip_min", "clip_max"], ["clipped"], name="clip")
    model.graph.node.insert(2, clip)
    return model


def test_infinite_clip_bound_is_not_a_bad_weight(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(_clip_with_infinite_bound().SerializeToString())
    outcome = run_clean(model, tmp_path / "cleaned.onnx", *QUICK_ARGS)
    assert outcome.exit_code in WRITTEN, outcome.stderr


def test_external_data_inside_the_folder_is_accepted(tmp_path: Path) -> None:
    # The external-data checks refuse escapes, not external data as such.
    prepared = corpus.external_valid(tmp_path)
    before = {path: _digest(path) for path in prepared.guarded}
    outcome = run_clean(prepared.model, prepared.output, *prepared.args)
    assert outcome.exit_code in WRITTEN, outcome.stderr
    assert {path: _digest(path) for path in prepared.guarded} == before
    # The output inlines the weights: it must not point at the input's weights.bin.
    cleaned = onnx.load_model_from_string(prepared.output.read_bytes())
    assert not any(t.external_data for t in cleaned.graph.initializer)


def test_written_file_gets_normal_permissions(tmp_path: Path) -> None:
    # mkstemp makes 0o600 files; the output must get the usual 0o666 - umask instead.
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.onnx", b"data")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.onnx").stat().st_mode & 0o777 == 0o644


def test_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "cleaned.onnx"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640


def test_temp_file_creation_failure_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The folder can fill up or vanish between check_output_path and the write.
    monkeypatch.setattr("otbr_onnx.output.tempfile.mkstemp", _enospc)
    with pytest.raises(UsageError):
        atomic_write(tmp_path / "cleaned.onnx", b"data")
    assert list(tmp_path.iterdir()) == []
