"""Shared test settings.

The method tests exercise pruning, fusion and the fidelity-first ratio rule on tiny models. A
5-step scan of such a model flags classes more or less at random, so their options switch the
scan's verdict off (an unreachable threshold) and clean ``always`` with the NWC ranking; the
scan, the pass-through and the rescan-driven rule have their own tests (tests/test_scan.py).
"""

# Options of ``clean`` that keep a tiny model's run under a second, for the API ...
FAST = dict(iterations=3, batch_size=16, lr=1e-2, seed=0, always=True, ranking="nwc", scan_starts=2, scan_steps=5,
            scan_threshold=1e9)
# ... and the same on the command line.
FAST_ARGS = ["--iterations", "3", "--batch-size", "16", "--lr", "1e-2", "--always", "--ranking", "nwc",
             "--scan-starts", "2", "--scan-steps", "5", "--scan-threshold", "1e9"]
