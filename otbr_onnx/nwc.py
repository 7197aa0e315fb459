"""Stage 4a: neuron weight change (NWC) and the global ranking of neurons."""

from __future__ import annotations

import numpy as np


def neuron_weight_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """NWC of each neuron: ``sum |after[k] - before[k]|`` over the neuron's weights (rows)."""
    delta = np.abs(after.astype(np.float64) - before.astype(np.float64))
    return delta.reshape(delta.shape[0], -1).sum(axis=1)


def scaled_for_ranking(values: np.ndarray, fan_in: int, scale: str) -> np.ndarray:
    """NWC as the global ranking compares it across layers: ``"sum"`` as is (the paper), or
    ``"mean"`` per weight (divided by the neuron's fan-in), since a sum over more weights is
    larger for the layer's size alone."""
    if scale == "sum":
        return values
    if scale == "mean":
        return values / fan_in
    raise ValueError(f"unknown NWC scale {scale!r}")


def global_ranking(nwc: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """All (layer, neuron) pairs, highest NWC first; ties broken by layer then neuron index
    so the order (and the output file) is deterministic."""
    pairs = [(layer, neuron) for layer in sorted(nwc) for neuron in range(len(nwc[layer]))]
    values = np.array([nwc[layer][neuron] for layer, neuron in pairs], dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    return [pairs[i] for i in order]


def summary(nwc: dict[int, np.ndarray]) -> dict[str, float]:
    values = np.concatenate([v for v in nwc.values()]) if nwc else np.zeros(0)
    if values.size == 0:
        return {"neurons": 0}
    return {
        "neurons": int(values.size),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "max": float(values.max()),
        "zero": int(np.sum(values == 0)),
    }
