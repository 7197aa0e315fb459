"""Bounded work (issue 23): ``budget.check_work`` and the --data / --max-classes option checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from otbr_onnx.budget import check_work, scan_passes
from otbr_onnx.detectors.margin import ScanConfig, scan_module
from otbr_onnx.errors import UnsupportedModelError, UsageError
from otbr_onnx.options import CleanOptions, DataOptions, ScanOptions
from otbr_onnx.output import check_data_paths


class CountingLinear(nn.Module):
    """A linear classifier that counts the images it is run on."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, classes)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("classes", [5, 40])  # below and above detect's refine (32): screened or not
def test_scan_passes_is_what_the_scan_runs(classes: int) -> None:
    module = CountingLinear(classes)
    scan_module(module, (1, 1, 2, 2), classes, 0, False, ScanConfig(starts=2, steps=8))
    assert module.images == scan_passes(classes, 2, 8)


def test_check_work_refuses_above_max_classes_and_names_the_option() -> None:
    check_work(1000, CleanOptions())
    with pytest.raises(UnsupportedModelError) as caught:
        check_work(100_000, CleanOptions())
    message = str(caught.value)
    assert caught.value.exit_code == 3 and "--max-classes" in message and "100000 classes" in message
    assert f"{scan_passes(100_000, 8, 100):,}" in message
    check_work(100_000, CleanOptions(scan=ScanOptions(max_classes=100_000)))


@pytest.mark.parametrize("options, match", [
    (CleanOptions(data=DataOptions(mean=(0.5,))), "give --data too"),
    (CleanOptions(data=DataOptions(path="d", std=(0.0,))), "--data-std must be > 0"),
    (CleanOptions(data=DataOptions(path="d", mean=(float("nan"),))), "finite"),
    (CleanOptions(scan=ScanOptions(max_classes=0)), "--max-classes"),
])
def test_options_validate_the_data_fields(options: CleanOptions, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        options.validate()


def test_data_paths_never_overlap_outputs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    npz = tmp_path / "d.npz"
    npz.touch()
    check_data_paths(data, [tmp_path / "out.onnx"], [tmp_path / "out"])
    for outputs, out_dirs in (([data / "c.onnx"], []), ([data], []), ([], [data]), ([], [data / "x"]),
                              ([], [tmp_path])):
        with pytest.raises(UsageError, match="--data"):
            check_data_paths(data, outputs, out_dirs)
    with pytest.raises(UsageError, match="is, or is inside, the --data"):
        check_data_paths(npz, [npz], [])
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(UsageError):  # through a link to the folder
        check_data_paths(data, [tmp_path / "link" / "c.onnx"], [])


def test_stage_log_speaks_for_long_stages_only() -> None:
    from otbr_onnx.cli import StageLog

    now = [0.0]
    log = StageLog(after_s=5.0, every_s=60.0, clock=lambda: now[0])
    lines = []
    for step in range(1, 11):  # 10 steps of 0.1 s: a 1 s stage, never reported
        lines.append(log.line("quick", step, 10))
        now[0] += 0.1
    assert lines == [None] * 10
    assert log.line("scan", 1, 1000) is None  # the first update only starts the clock
    now[0] += 0.5
    first = log.line("scan", 2, 1000)  # 0.5 s a step, 998 to go: long
    assert first == "otbr-onnx: scan: 2/1000 steps, about 8 min 19 s left"
    now[0] += 30
    assert log.line("scan", 62, 1000) is None  # no heartbeat before a minute
    now[0] += 31
    assert log.line("scan", 124, 1000).startswith("otbr-onnx: scan: 124/1000 steps")
