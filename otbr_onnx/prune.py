"""Stage 4 (select), inside ``repair``: prune the top ``gamma`` share of the global ranking (NWC or
activation score; CLP brings its own masks)."""

from __future__ import annotations

import math

import numpy as np


def select_pruned(ranking: list[tuple[int, int]], sizes: dict[int, int], ratio: float) -> dict[int, np.ndarray]:
    """Boolean masks (True = pruned) for the first ``floor(ratio * N)`` ranked neurons.

    A layer is never emptied completely: pruning every neuron of a layer cuts the network,
    so the last neuron of a layer is skipped and the next candidate taken instead.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    masks = {layer: np.zeros(size, dtype=bool) for layer, size in sizes.items()}
    budget = math.floor(ratio * len(ranking))
    for layer, neuron in ranking:
        if budget <= 0:
            break
        if masks[layer].sum() + 1 >= sizes[layer]:
            continue
        masks[layer][neuron] = True
        budget -= 1
    return masks


def prune_rows(rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``rows`` (neurons first) with the masked neurons zeroed."""
    pruned = rows.copy()
    pruned[mask] = 0
    return pruned
