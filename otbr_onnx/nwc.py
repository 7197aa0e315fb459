"""Stage 3 (rank), ``nwc`` score: neuron weight change (NWC) and the global ranking of neurons."""

from __future__ import annotations

import numpy as np


def neuron_weight_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    r"""Neuron weight change (NWC) of each neuron during random unlearning.

    .. math::
        \mathrm{NWC}_k = \lVert W_u[k] - W[k] \rVert_1 = \sum_{c, \dots} \lvert W_u[k, c, \dots] - W[k, c, \dots] \rvert

    OTBR's stage 1 ranks neurons by it: under unlearning on noise, backdoor-related neurons
    move more.

    Parameters
    ----------
    before : ndarray, shape (n, ...)
        A layer's rows ``W`` (``layers.to_rows``: one row per neuron) before unlearning.
    after : ndarray, shape (n, ...)
        The same rows ``W_u`` after unlearning.

    Returns
    -------
    nwc : ndarray, shape (n,), float64

    References
    ----------
    .. [1] W. Lin, L. Liu, J. Li, H. Xiong, "Fusing Pruned and Backdoored Models: Optimal
       Transport-based Data-free Backdoor Mitigation", AAAI 2025, arXiv:2408.15861.
    """
    delta = np.abs(after.astype(np.float64) - before.astype(np.float64))
    return delta.reshape(delta.shape[0], -1).sum(axis=1)


def scaled_for_ranking(values: np.ndarray, fan_in: int, scale: str) -> np.ndarray:
    """NWC as the global ranking compares it across layers: ``"sum"`` as is (the paper), or
    ``"mean"`` per weight (divided by the neuron's fan-in), since a sum over more weights is
    larger for the layer's size alone.

    Parameters
    ----------
    values : ndarray, shape (n,)
        A layer's NWC.
    fan_in : int
        Weights per neuron (the size of one row).
    scale : {"sum", "mean"}

    Returns
    -------
    ndarray, shape (n,)
    """
    if scale == "sum":
        return values
    if scale == "mean":
        return values / fan_in
    raise ValueError(f"unknown NWC scale {scale!r}")


def global_ranking(nwc: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """All (layer, neuron) pairs of all ranked layers together, highest NWC first.

    Pruning zeroes the first ``floor(gamma * N)`` of them (``prune.select_pruned``). Ties are
    broken by layer then neuron index, so the order (and the output file) is deterministic.

    Parameters
    ----------
    nwc : dict of int to ndarray
        Layer position -> NWC of its ``n_l`` neurons, shape ``(n_l,)``.

    Returns
    -------
    list of (int, int), length N = sum of n_l
        ``(layer, neuron)`` pairs.

    References
    ----------
    .. [1] W. Lin, L. Liu, J. Li, H. Xiong, "Fusing Pruned and Backdoored Models: Optimal
       Transport-based Data-free Backdoor Mitigation", AAAI 2025, arXiv:2408.15861.
    """
    pairs = [(layer, neuron) for layer in sorted(nwc) for neuron in range(len(nwc[layer]))]
    values = np.array([nwc[layer][neuron] for layer, neuron in pairs], dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    return [pairs[i] for i in order]

