"""Baseline: Channel Lipschitzness-based Pruning (CLP, Zheng et al., ECCV 2022), data-free.

A channel's upper-bound Lipschitz constant (UCLC) is the spectral norm of its weights seen as
a matrix ``[in, kernel]``. Channels whose UCLC exceeds ``mean + u * std`` of their layer are
pruned (zeroed). BN-folded convs (what torch's exporter writes) already carry the BN scale in
their weights, so the bound needs no separate BN term there.
"""

from __future__ import annotations

import numpy as np


def channel_lipschitz(rows: np.ndarray) -> np.ndarray:
    """Spectral norm of each neuron's weights reshaped to ``[in, prod(kernel)]``."""
    n, cin = rows.shape[0], rows.shape[1] if rows.ndim > 1 else 1
    mats = rows.reshape(n, cin, -1).astype(np.float64)
    return np.linalg.norm(mats, ord=2, axis=(1, 2))


def clp_masks(rows: dict[int, np.ndarray], u: float = 3.0) -> dict[int, np.ndarray]:
    """Per layer: True for channels whose UCLC is above ``mean + u * std`` of that layer."""
    masks = {}
    for layer, weights in rows.items():
        uclc = channel_lipschitz(weights)
        masks[layer] = uclc > uclc.mean() + u * uclc.std()
    return masks
