"""Stage 4 (select), per candidate ratio: prune the top of the ranking and fuse the pruned model
into the original (OTBR).

``repair(prepared, ranking, ratio, options)`` gives the new values of every initializer it
changed, checked finite, in the ONNX layout; nothing is written anywhere. The baselines stop
early: ``prune-only`` hands back the pruned weights, ``clp`` prunes CLP's own channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from otbr_onnx import fuse as fusion
from otbr_onnx import prune as prune_stage
from otbr_onnx.errors import UnsupportedModelError
from otbr_onnx.layers import from_rows
from otbr_onnx.options import CleanOptions
from otbr_onnx.rank import CONV_OPS, Ranking
from otbr_onnx.ties import SOURCE

if TYPE_CHECKING:
    from otbr_onnx.prepare import PreparedModel


@dataclass
class Repair:
    """One candidate cleaning: which neurons were pruned, what fusion did, and the new weights."""

    ratio: float | None
    masks: dict[int, np.ndarray]  # layer -> (neurons,) True = pruned
    record: fusion.FusionRecord = field(default_factory=fusion.FusionRecord)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # initializer -> new value

    @property
    def pruned(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))


def repair(prepared: "PreparedModel", ranking: Ranking, ratio: float | None, options: CleanOptions) -> Repair:
    """Prune ``ratio`` of the ranked neurons (CLP: its own masks) and, for OTBR, fuse."""
    if ranking.clp is not None:
        masks = ranking.clp
    else:
        sizes = {i: prepared.layers[i].out_channels for i in ranking.ranked}
        masks = prune_stage.select_pruned(ranking.order, sizes, ratio or 0.0)
    backdoored = {i: prepared.neurons(i) for i in range(len(prepared.layers))}
    pruned = {i: _pruned(n, masks.get(i)) for i, n in backdoored.items()}
    record = fusion.FusionRecord()
    if options.removal.method == "otbr":
        experiment = options.experiment
        pruned, record = fusion.fuse(
            prepared.ties, backdoored, pruned, ranking.weights, options.removal.fusion_lambda,
            fused_layers(prepared, masks, options), experiment.aligned_cost, experiment.nwc_power,
        )
    return Repair(ratio, masks, record, changed_weights(prepared, backdoored, pruned))


def fused_layers(prepared: "PreparedModel", masks: dict[int, np.ndarray], options: CleanOptions) -> set[int]:
    """Layers fused: from the first layer (in graph order) holding a pruned neuron onwards; a tied
    group is fused as a whole or not at all."""
    layers, ties = prepared.layers, prepared.ties
    pruned_nodes = [layers[i].node_index for i, m in masks.items() if m.any()]
    if not pruned_nodes or options.removal.fusion_lambda == 0.0:
        return set()
    first = min(pruned_nodes)
    chosen = set()
    for i, layer in enumerate(layers):
        if options.experiment.layers == "conv" and layer.op_type not in CONV_OPS:
            continue
        if i in ties.heads and not options.experiment.fuse_head:
            continue
        late = layer.node_index >= first
        if ties.roles[i] == SOURCE:
            late = max(layers[j].node_index for j in ties.members(ties.groups[i])) >= first
        if late:
            chosen.add(i)
    return chosen


def changed_weights(prepared: "PreparedModel", backdoored: dict[int, fusion.Neurons],
                    fused: dict[int, fusion.Neurons]) -> dict[str, np.ndarray]:
    """ONNX-layout arrays for every initializer whose value changed, checked finite."""
    changed: dict[str, np.ndarray] = {}
    for i, layer in enumerate(prepared.layers):
        old, new = backdoored[i], fused[i]
        if new is old:
            continue
        pairs = [(layer.weight, from_rows(layer, new.rows), from_rows(layer, old.rows))]
        if layer.bias:
            pairs.append((layer.bias, new.bias, old.bias))
        for name, value, before in pairs:
            if not np.all(np.isfinite(value)):
                raise UnsupportedModelError(f"fusion produced non-finite weights in '{name}'; refusing to write")
            if not np.array_equal(value, before):
                changed[name] = value.astype(np.float32)
    return changed


def _pruned(neurons: fusion.Neurons, mask: np.ndarray | None) -> fusion.Neurons:
    if mask is None or not mask.any():
        return neurons
    bias = None if neurons.bias is None else prune_stage.prune_rows(neurons.bias, mask)
    return fusion.Neurons(prune_stage.prune_rows(neurons.rows, mask), bias)
