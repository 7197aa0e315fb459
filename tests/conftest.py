"""Shared test settings and fixtures.

The method tests exercise pruning, fusion and the fidelity-first ratio rule on tiny models. A
5-step scan of such a model flags classes more or less at random, so their options switch the
scan's verdict off (an unreachable threshold) and clean ``always`` with the NWC ranking; the
scan, the pass-through and the rescan-driven rule have their own tests (tests/test_scan.py).

The tests' models and helpers live in ``tests/builders.py`` (the tiny Chain and PreAct-ResNet,
the legacy export, ``logits``/``ort_run`` through onnxruntime) and ``tests/zoo.py`` (one tiny
model per architecture family, two exporters).
"""

import signal

import pytest

from otbr_onnx.options import CleanOptions, RemovalOptions, RunOptions, ScanOptions

# Options of ``clean`` that keep a tiny model's run under a second, for the API (more fields
# changed: ``FAST.with_(removal={"prune_ratio": 0.2})``) ...
FAST = CleanOptions(scan=ScanOptions(starts=2, steps=5, threshold=1e9),
                    removal=RemovalOptions(iterations=3, batch_size=16, lr=1e-2, always=True, ranking="nwc"),
                    run=RunOptions(seed=0))
# ... and the same on the command line.
FAST_ARGS = ["--iterations", "3", "--batch-size", "16", "--lr", "1e-2", "--always", "--ranking", "nwc",
             "--scan-starts", "2", "--scan-steps", "5", "--scan-threshold", "1e9"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch intra-op thread for every module of tests (they run tiny models).

    With a second thread on a busy 2-core machine, torch spends its time waiting for the other
    thread (a 0.05 s clean took 1.1 s). The previous count is restored after each module.
    """
    import torch  # here, not at the top: collecting the tests does not wait for it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def default_ctrl_c():
    """Ctrl-C handled as Python's default in the test process. A CLI path run in-process
    (``exit_interrupted``, the batch's ``_sigint_ignored``) can leave SIGINT ignored in pytest
    itself, and an ignored signal stays ignored in every subprocess started later: a later test
    that sends Ctrl-C to its CLI then saw the signal lost (twice, after the whole suite)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
