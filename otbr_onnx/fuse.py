"""Stage 4 (select), inside ``repair``: optimal-transport fusion of the pruned model into the
backdoored one.

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
    r"""Target marginal ``q`` over a layer's backdoored neurons, from their NWC.

    .. math::
        q_j = \frac{v_j + \epsilon \bar v}{\sum_k (v_k + \epsilon \bar v)}, \quad v_j = \mathrm{NWC}_j^{\,p}

    with :math:`\bar v` the mean of :math:`v` and :math:`\epsilon` = ``NWC_FLOOR`` (a dead
    neuron, NWC 0, would otherwise get no mass and divide by zero in ``diag(1/q)``). The paper
    uses :math:`p = 1`; a power below 1 flattens ``q``, so fewer neurons are mixed.

    Parameters
    ----------
    nwc : array-like, shape (n,)
        Neuron weight change of each of the layer's ``n`` neurons (non-negative).
    power : float, default 1.0
        Exponent :math:`p` applied to the NWC.

    Returns
    -------
    q : ndarray, shape (n,), float64
        Positive, sums to 1. Uniform where the NWC mean is zero or not finite.

    References
    ----------
    .. [1] W. Lin, L. Liu, J. Li, H. Xiong, "Fusing Pruned and Backdoored Models: Optimal
       Transport-based Data-free Backdoor Mitigation", AAAI 2025, arXiv:2408.15861.
    """
    nwc = np.asarray(nwc, dtype=np.float64) ** power
    mean = nwc.mean() if nwc.size else 0.0
    if not np.isfinite(mean) or mean <= 0:
        return np.full(nwc.shape, 1.0 / max(nwc.size, 1))
    q = nwc + NWC_FLOOR * mean
    return q / q.sum()


def transport_plan(cost: np.ndarray, q: np.ndarray) -> np.ndarray:
    r"""Exact optimal-transport plan from the pruned neurons (uniform) to the backdoored ones (``q``).

    .. math::
        T = \arg\min_{T \ge 0} \langle T, C \rangle_F
        \quad \text{s.t.} \quad T \mathbf{1} = p = \tfrac{1}{n} \mathbf{1}, \quad T^\top \mathbf{1} = q

    solved with POT's network simplex (``ot.emd``), as in the paper's stage 2.

    Parameters
    ----------
    cost : ndarray, shape (n, n)
        ``C[i, j]``: distance between pruned neuron ``i`` and backdoored neuron ``j``.
    q : ndarray, shape (n,)
        Target marginal (``marginal``), sums to 1.

    Returns
    -------
    T : ndarray, shape (n, n), float64
        The plan; row ``i`` sums to ``1/n``, column ``j`` to ``q[j]`` (up to EMD's rounding).

    References
    ----------
    .. [1] W. Lin, L. Liu, J. Li, H. Xiong, "Fusing Pruned and Backdoored Models: Optimal
       Transport-based Data-free Backdoor Mitigation", AAAI 2025, arXiv:2408.15861.
    """
    n = cost.shape[0]
    p = ot.unif(n)
    return ot.emd(p, q, np.ascontiguousarray(cost, dtype=np.float64), numItermax=max(100_000, 50 * n * n))


def alignment(plan: np.ndarray) -> np.ndarray:
    r"""Column-normalised plan: column ``j`` becomes convex weights over the pruned neurons.

    .. math::
        A = T \, \mathrm{diag}(1 / T^\top \mathbf{1})

    The paper writes ``T diag(1/q)``; normalising by the plan's own column sums keeps every
    column an exact convex combination where EMD's marginals are off by rounding. A column with
    no mass keeps its own neuron (``A[j, j] = 1``).

    Parameters
    ----------
    plan : ndarray, shape (n, n)
        A transport plan ``T`` (``transport_plan``).

    Returns
    -------
    A : ndarray, shape (n, n)
        Non-negative; every column sums to 1.
    """
    mass = plan.sum(axis=0)
    A = np.divide(plan, mass, out=np.zeros_like(plan), where=mass > 0)
    empty = mass <= 0
    A[:, empty] = 0.0
    A[empty, empty] = 1.0
    return A


def group_alignment(pruned: list[Neurons], backdoored: list[Neurons], nwc: list[np.ndarray],
                    power: float = 1.0) -> np.ndarray:
    r"""One alignment for all ``m`` layers of a tied group (``ties.TieGroup``), from one OT problem.

    Each neuron ``k`` of the group is the concatenation of neuron ``k`` of every member, so

    .. math::
        C_{ij} = \lVert [W_p^{(1)}[i], \dots, W_p^{(m)}[i]] - [W_b^{(1)}[j], \dots, W_b^{(m)}[j]] \rVert_2,
        \qquad q = \mathrm{marginal}\big(\textstyle\sum_l \mathrm{NWC}^{(l)}\big)

    and ``A = alignment(symmetrise(emd(1/n, q, C)))``. For a group of one layer this is the
    paper's per-layer plan.

    Parameters
    ----------
    pruned : list of Neurons, length m
        The members' pruned neurons, ``rows`` of shape ``(n, d_l...)`` (input-aligned or raw).
    backdoored : list of Neurons, length m
        The members' backdoored neurons, same shapes.
    nwc : list of ndarray, length m, each shape (n,)
        The members' NWC; summed per neuron.
    power : float, default 1.0
        See ``marginal``.

    Returns
    -------
    A : ndarray, shape (n, n)
        Shared by every member: transported rows ``A^T Wp'``, and the input alignment of every
        layer that reads the group's channels.

    References
    ----------
    .. [1] W. Lin, L. Liu, J. Li, H. Xiong, "Fusing Pruned and Backdoored Models: Optimal
       Transport-based Data-free Backdoor Mitigation", AAAI 2025, arXiv:2408.15861.
    """
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

    Parameters
    ----------
    plan : ndarray, shape (n, n)
        An optimal plan for ``(1/n, q, C(wp, wb))``.
    wp : ndarray, shape (n, d)
        Flattened pruned neurons (rows of the cost's first argument).
    wb : ndarray, shape (n, d)
        Flattened backdoored neurons.
    q : ndarray, shape (n,)
        Target marginal.

    Returns
    -------
    plan : ndarray, shape (n, n)
        A new array, constant over each class of identical rows / columns; same marginals.
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
    r"""The map that re-expresses a layer's input channels in the transported order.

    A layer's input axis is a concatenation of segments (``ties.Channels``), each the output
    channels of one source layer or a fixed block. Each segment is mapped by its source
    group's alignment (``group_alignment``), a fixed block or an untransported source by the
    identity:

    .. math::
        A_{in} = \mathrm{blockdiag}(A_{g(s_1)}, \dots, A_{g(s_k)}), \qquad W_p' = W_p \times_{in} A_{in}

    Parameters
    ----------
    channels : ties.Channels or None
        What the layer's input axis carries; None where it is fixed (nothing to align).
    plans : dict of int to ndarray
        Group id -> alignment ``A``, shape ``(n_g, n_g)``, for the groups transported so far.
    group_of : list of int
        Group id of each weight layer (``ChannelTies.groups``).

    Returns
    -------
    A_in : ndarray, shape (w, w), or None
        ``w = channels.width`` (before ``repeat``); None where every block is the identity.
    """
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
    r"""Re-express the input axis (axis 1) of ``rows`` in the transported channel order.

    .. math::
        W_p'[o, v, r, \dots] = \sum_w W_p[o, w, r, \dots] \, A[w, v]

    With ``repeat > 1`` every channel spans ``repeat`` consecutive inputs (a flattened feature
    map), so ``A`` acts on channels without ever forming ``kron(A, I)``.

    Parameters
    ----------
    rows : ndarray, shape (n_out, w * repeat, ...)
        A layer's rows (``layers.to_rows``): one per neuron, input channels on axis 1.
    A : ndarray, shape (w, w)
        Input alignment (``input_alignment``).
    repeat : int
        Consecutive inputs per channel (``Channels.repeat``).

    Returns
    -------
    aligned : ndarray, same shape as ``rows``, float64
    """
    out, width = rows.shape[0], A.shape[0]
    grouped = rows.reshape(out, width, repeat, -1).astype(np.float64)
    # tensordot runs on BLAS; the equivalent einsum("owrk,wv->ovrk") did not and took 90% of fusion
    aligned = np.moveaxis(np.tensordot(grouped, A, axes=([1], [0])), -1, 1)
    return aligned.reshape(rows.shape)


def transport(neurons: Neurons, A: np.ndarray) -> Neurons:
    r"""Move pruned neurons onto the backdoored neurons' order: :math:`W_t = A^\top W_p'`.

    Neuron ``j`` becomes the convex mix ``sum_i A[i, j] Wp'[i]`` (bias likewise).

    Parameters
    ----------
    neurons : Neurons
        ``rows`` of shape ``(n, ...)``, optional ``bias`` of shape ``(n,)``.
    A : ndarray, shape (n, n)
        Alignment (``alignment`` / ``group_alignment``).

    Returns
    -------
    Neurons
        Rows ``(n, ...)`` and bias ``(n,)``, float64.
    """
    rows = np.tensordot(A.T, neurons.rows.astype(np.float64), axes=(1, 0))
    bias = None if neurons.bias is None else A.T @ neurons.bias.astype(np.float64)
    return Neurons(rows, bias)


def mix(transported: Neurons, backdoored: Neurons, lam: float) -> Neurons:
    r"""The fused layer: :math:`W_f = \lambda W_t + (1 - \lambda) W_b`, in the backdoored dtype.

    Parameters
    ----------
    transported : Neurons
        Transported pruned neurons, rows ``(n, ...)``.
    backdoored : Neurons
        Backdoored neurons, same shapes; its ``bias`` decides whether the result has one.
    lam : float
        :math:`\lambda` in [0, 1]; 0 gives the backdoored weights back exactly.

    Returns
    -------
    Neurons
        Rows ``(n, ...)`` and bias ``(n,)`` in ``backdoored``'s dtypes.
    """
    rows = (lam * transported.rows + (1.0 - lam) * backdoored.rows).astype(backdoored.rows.dtype)
    bias = None
    if backdoored.bias is not None:
        bias = (lam * transported.bias + (1.0 - lam) * backdoored.bias).astype(backdoored.bias.dtype)
    return Neurons(rows, bias)


def fuse(
    ties: ChannelTies,
    backdoored: dict[int, Neurons],
    pruned: dict[int, Neurons],
    neuron_weights: dict[int, np.ndarray],
    lam: float,
    fused_layers: set[int],
    aligned_cost: bool = True,
    nwc_power: float = 1.0,
) -> tuple[dict[int, Neurons], FusionRecord]:
    r"""Stage 2 of OTBR: fuse the pruned model into the backdoored one, layer by layer.

    For every layer ``l`` in ``fused_layers`` (of group ``g``)

    .. math::
        W_f^{(l)} = \lambda \, A_g^\top \big(W_p^{(l)} \times_{in} A_{in}^{(l)}\big)
                    + (1 - \lambda) \, W_b^{(l)}

    with ``A_g = group_alignment(...)`` shared by the group's members (identity for a pinned
    group or an unfused one; a follower uses its input's alignment as its own) and
    ``A_in = input_alignment(...)``. The others keep their backdoored weights.

    A tied group gets an OT plan when one of its members is fused and the group is not
    pinned. Plans are computed in graph order. With ``aligned_cost`` the cost compares pruned
    rows whose inputs are already re-expressed with the plans computed so far (a group member
    reading a later group uses the identity there), so a reordered copy of a model is matched
    exactly; without it the cost uses raw pruned rows, as the reference does. Either way every
    layer is finally transported with the final plans, so inputs and outputs always agree.

    Parameters
    ----------
    ties : ChannelTies
        Roles, groups and input channel maps of the ``L`` weight layers (``ties.analyse``).
    backdoored : dict of int to Neurons
        Layer position -> the original neurons, rows ``(n_l, ...)``, bias ``(n_l,)``.
    pruned : dict of int to Neurons
        Layer position -> pruned neurons (pruned rows zeroed), same shapes.
    neuron_weights : dict of int to ndarray
        Layer position -> each neuron's non-negative weight in the OT marginal, shape ``(n_l,)``,
        for every non-follower layer: whatever the ranking gives (``rank.Ranking.weights``: the
        paper's NWC, or the activation score's weights).
    lam : float
        :math:`\lambda` in [0, 1]; 0 returns ``backdoored`` unchanged.
    fused_layers : set of int
        Positions of the layers to fuse.
    aligned_cost : bool, default True
        OT cost on input-aligned pruned rows (True) or on raw pruned rows (the reference).
    nwc_power : float, default 1.0
        See ``marginal``.

    Returns
    -------
    fused : dict of int to Neurons
        Every layer of ``backdoored``; unfused ones are the very same objects.
    record : FusionRecord
        The plan each group got ("ot" or "identity: reason") and the layers changed.

    References
    ----------
    .. [1] W. Lin, L. Liu, J. Li, H. Xiong, "Fusing Pruned and Backdoored Models: Optimal
       Transport-based Data-free Backdoor Mitigation", AAAI 2025, arXiv:2408.15861.
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
        plans[group] = group_alignment(candidates, [backdoored[m] for m in members], [neuron_weights[m] for m in members],
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
