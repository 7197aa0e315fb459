"""Stage 5: optimal-transport fusion of the pruned model into the backdoored one.

For a layer with ``n`` neurons, pruned rows ``Wp`` and backdoored rows ``Wb``:

* ``C[i, j] = ||Wp[i] - Wb[j]||_2`` over the flattened neuron (weights and bias);
* ``p = 1/n`` uniform over pruned neurons, ``q`` proportional to each backdoored neuron's NWC;
* ``T = emd(p, q, C)``, the exact OT plan;
* ``A = T diag(1 / T^T 1)``: column ``j`` of ``A`` is a convex combination of pruned neurons;
* transported rows ``Wt = A^T Wp'``, where ``Wp'`` has its input channels re-expressed with the
  previous layers' ``A`` (``Wp' = Wp x_in A_in``);
* fused rows ``Wf = lambda * Wt + (1 - lambda) * Wb``.

The fused model keeps the backdoored model's neuron order, so everything that is not a weight
layer (BatchNorm, biases of Add nodes, class order) stays valid. Plans are shared by tied
layers (see ``ties``); the OT cost is computed on the pruned weights before input alignment,
as the reference does, which lets every plan be computed before any layer is transported.
Normalising by ``T^T 1`` instead of ``q`` keeps each column an exact convex combination even
where EMD's marginals are off by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ot
from scipy.linalg import block_diag

from otbr_onnx.ties import FOLLOWER, PINNED, SOURCE, ChannelTies, Channels

# q_j = 0 (a dead neuron: zero NWC) would divide by zero in diag(1/q) and make the model NaN;
# a floor proportional to the layer's mean NWC keeps the order of q and the plan finite.
NWC_FLOOR = 1e-3


@dataclass
class Neurons:
    """A layer's rows ``[out, in, ...]`` and optional per-neuron bias."""

    rows: np.ndarray
    bias: np.ndarray | None = None

    def flat(self) -> np.ndarray:
        flat = self.rows.reshape(self.rows.shape[0], -1).astype(np.float64)
        return flat if self.bias is None else np.hstack([flat, self.bias.astype(np.float64)[:, None]])


@dataclass
class FusionRecord:
    """What fusion did to each layer, for the report."""

    plans: dict[int, str] = field(default_factory=dict)  # group -> "ot" | "identity: reason"
    fused: list[int] = field(default_factory=list)  # layer positions whose weights changed


def marginal(nwc: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Target marginal ``q`` from NWC values: proportional to ``NWC ** power`` (the paper: 1),
    with a floor, summing to 1. A power below 1 flattens q, so fewer neurons are mixed."""
    nwc = np.asarray(nwc, dtype=np.float64) ** power
    mean = nwc.mean() if nwc.size else 0.0
    if not np.isfinite(mean) or mean <= 0:
        return np.full(nwc.shape, 1.0 / max(nwc.size, 1))
    q = nwc + NWC_FLOOR * mean
    return q / q.sum()


def transport_plan(cost: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact OT plan from uniform ``p`` to ``q`` under ``cost`` (POT's network simplex)."""
    n = cost.shape[0]
    p = np.full(n, 1.0 / n)
    return ot.emd(p, q, np.ascontiguousarray(cost, dtype=np.float64), numItermax=max(100_000, 50 * n * n))


def alignment(plan: np.ndarray) -> np.ndarray:
    """``A = T diag(1 / column sums)``; a column with no mass keeps its own neuron."""
    mass = plan.sum(axis=0)
    A = np.divide(plan, mass, out=np.zeros_like(plan), where=mass > 0)
    empty = mass <= 0
    A[:, empty] = 0.0
    A[empty, empty] = 1.0
    return A


def group_alignment(pruned: list[Neurons], backdoored: list[Neurons], nwc: list[np.ndarray],
                    power: float = 1.0) -> np.ndarray:
    """One plan for all layers of a tied group: costs add up over members, NWCs too."""
    wp = np.hstack([m.flat() for m in pruned])
    wb = np.hstack([m.flat() for m in backdoored])
    cost = ot.dist(wp, wb, metric="euclidean")
    q = marginal(np.sum(nwc, axis=0), power)
    return alignment(symmetrise(transport_plan(cost, q), wp, wb, q))


def symmetrise(plan: np.ndarray, wp: np.ndarray, wb: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Average the plan over identical pruned rows (all pruned neurons are zero) and over
    identical backdoored neurons with equal ``q``.

    EMD breaks such ties by neuron order, so without this the plan, and every later layer's
    input alignment, would depend on how the input model happened to order its neurons. The
    average of optimal plans over a symmetry of the problem is still optimal.
    """
    plan = plan.copy()
    for classes, axis in ((_row_classes(wp), 0), (_row_classes(np.hstack([wb, q[:, None]])), 1)):
        for label in np.unique(classes):
            index = np.flatnonzero(classes == label)
            if len(index) < 2:
                continue
            if axis == 0:
                plan[index] = plan[index].mean(axis=0)
            else:
                plan[:, index] = plan[:, index].mean(axis=1, keepdims=True)
    return plan


def _row_classes(rows: np.ndarray) -> np.ndarray:
    """A label per row, equal for identical rows (by value: + 0.0 folds -0.0 into 0.0). Keyed on
    the row bytes: np.unique(axis=0) sorts whole rows and cost a second per fusion on ResNet-18."""
    labels: dict[bytes, int] = {}
    canonical = np.ascontiguousarray(rows + 0.0)
    return np.array([labels.setdefault(row.tobytes(), len(labels)) for row in canonical], dtype=np.int64)


def input_alignment(channels: Channels | None, plans: dict[int, np.ndarray], group_of: list[int]) -> np.ndarray | None:
    """Block-diagonal map for a layer's input axis, or None where it is the identity."""
    if channels is None or not any(
        src is not None and group_of[src] in plans for src, _ in channels.segments
    ):
        return None
    blocks = [
        plans[group_of[src]] if src is not None and group_of[src] in plans else np.eye(length)
        for src, length in channels.segments
    ]
    return block_diag(*blocks)


def align_inputs(rows: np.ndarray, A: np.ndarray, repeat: int) -> np.ndarray:
    """Re-express the input axis (axis 1) of ``rows`` in the transported channel order.

    With ``repeat > 1`` every channel spans ``repeat`` consecutive inputs (a flattened feature
    map), so ``A`` acts on channels without ever forming ``kron(A, I)``.
    """
    out, width = rows.shape[0], A.shape[0]
    grouped = rows.reshape(out, width, repeat, -1).astype(np.float64)
    # tensordot runs on BLAS; the equivalent einsum("owrk,wv->ovrk") did not and took 90% of fusion
    aligned = np.moveaxis(np.tensordot(grouped, A, axes=([1], [0])), -1, 1)
    return aligned.reshape(rows.shape)


def transport(neurons: Neurons, A: np.ndarray) -> Neurons:
    """``A^T`` applied to the neuron axis: neuron ``j`` becomes a convex mix of rows ``i``."""
    rows = np.tensordot(A.T, neurons.rows.astype(np.float64), axes=(1, 0))
    bias = None if neurons.bias is None else A.T @ neurons.bias.astype(np.float64)
    return Neurons(rows, bias)


def mix(transported: Neurons, backdoored: Neurons, lam: float) -> Neurons:
    rows = (lam * transported.rows + (1.0 - lam) * backdoored.rows).astype(backdoored.rows.dtype)
    bias = None
    if backdoored.bias is not None:
        bias = (lam * transported.bias + (1.0 - lam) * backdoored.bias).astype(backdoored.bias.dtype)
    return Neurons(rows, bias)


def fuse(
    ties: ChannelTies,
    backdoored: dict[int, Neurons],
    pruned: dict[int, Neurons],
    nwc: dict[int, np.ndarray],
    lam: float,
    fused_layers: set[int],
    aligned_cost: bool = True,
    nwc_power: float = 1.0,
) -> tuple[dict[int, Neurons], FusionRecord]:
    """Fuse every layer in ``fused_layers``; the others keep their backdoored weights.

    A tied group gets an OT plan when one of its members is fused and the group is not
    pinned; pinned groups and unfused layers use the identity. Plans are computed in graph
    order. With ``aligned_cost`` the cost compares pruned rows whose inputs are already
    re-expressed with the plans computed so far (a group member reading a later group uses
    the identity there), so a reordered copy of a model is matched exactly; without it the
    cost uses raw pruned rows, as the reference does. Either way every layer is finally
    transported with the final plans, so inputs and outputs always agree.
    """
    record = FusionRecord()
    plans: dict[int, np.ndarray] = {}
    for i in sorted(fused_layers):
        group = ties.groups[i]
        if ties.roles[i] == PINNED:
            record.plans.setdefault(group, f"identity: {ties.pin_reasons.get(i, 'pinned')}")
        if ties.roles[i] != SOURCE or group in plans:
            continue
        members = ties.members(group)
        candidates = [_aligned(m, ties, pruned[m], plans) if aligned_cost else pruned[m] for m in members]
        plans[group] = group_alignment(candidates, [backdoored[m] for m in members], [nwc[m] for m in members],
                                        nwc_power)
        record.plans[group] = "ot"
    result: dict[int, Neurons] = {}
    for i, neurons in backdoored.items():
        if i not in fused_layers or lam == 0.0:
            result[i] = neurons
            continue
        result[i] = _fuse_layer(i, ties, pruned[i], neurons, plans, lam)
        record.fused.append(i)
    return result, record


def _aligned(i: int, ties: ChannelTies, pruned: Neurons, plans: dict[int, np.ndarray]) -> Neurons:
    """Pruned rows of layer ``i`` with the input axis re-expressed in the transported order."""
    channels = ties.inputs[i]
    A_in = input_alignment(channels, plans, ties.groups)
    if A_in is None:
        return pruned
    return Neurons(align_inputs(pruned.rows, A_in, channels.repeat), pruned.bias)


def _fuse_layer(i: int, ties: ChannelTies, pruned: Neurons, backdoored: Neurons,
                plans: dict[int, np.ndarray], lam: float) -> Neurons:
    if ties.roles[i] == FOLLOWER:
        # a depthwise conv has one input channel per neuron: it moves with its input's plan
        A_in = input_alignment(ties.inputs[i], plans, ties.groups)
        moved = pruned if A_in is None else transport(pruned, A_in)
        return mix(moved, backdoored, lam)
    aligned = _aligned(i, ties, pruned, plans)
    own = plans.get(ties.groups[i])
    moved = aligned if own is None else transport(aligned, own)
    return mix(moved, backdoored, lam)
