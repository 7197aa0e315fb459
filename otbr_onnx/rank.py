"""Stage 3 (rank): score every neuron, rank them for pruning, and give the fusion its target marginal.

Two scores, one shape of result (``Ranking``):

* ``activation`` (target-aware, the default when the scan suspects a class ``t``): how much more a
  neuron fires on the inputs that reach ``t``'s abnormal margin than on the other classes'
  maximum-margin inputs,

      s_k = (a_t[k] - a_o[k]) / (a_t[k] + a_o[k]),   a[k] = mean ReLU of neuron k's output

  in [-1, 1]. Backdoor neurons carry the trigger, which only ``t``'s maximisers contain.
* ``nwc`` (the paper's): the neuron weight change under random unlearning (``unlearn.py``,
  ``nwc.py``), used when no class is suspected (``clean --always``) and by ``--reference``.

Either way every layer with neurons of its own gets a non-negative *marginal weight*: the OT
fusion gives high-weight neurons more mass, so they are rebuilt from pruned, clean neurons. For
the NWC it is the NWC (the paper). For the activation score it is ``1 + ACTIVATION_BOOST * max(s, 0)``:
every neuron keeps a share of its own (a weight of ``max(s, 0)`` alone starves the indifferent
half of a layer and makes every layer's suspicious neurons absorb its whole mass). Only ``ranked`` layers enter the global pruning order: never the
classifier head (its neurons are classes), never depthwise or grouped convs (a depthwise channel
is not an independent neuron: ranking them collapsed a MobileNetV2 to chance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from otbr_onnx import nwc as nwc_stage
from otbr_onnx.clp import clp_masks
from otbr_onnx.errors import UnsupportedModelError
from otbr_onnx.layers import CONV, CONV_T, OUT_IN, to_rows
from otbr_onnx.options import CleanOptions
from otbr_onnx.bridge import module_names
from otbr_onnx.sizing import release_memory
from otbr_onnx.ties import FOLLOWER
from otbr_onnx.unlearn import UnlearnConfig, UnlearnLog, random_unlearning

if TYPE_CHECKING:
    from otbr_onnx.prepare import PreparedModel

CONV_OPS = ("Conv", "ConvTranspose")
# A neuron that fires only on the target's inputs (s = 1) gets 1 + 1 = 2 times the fusion mass of
# an indifferent one. On the demo at gamma 0.02 (lambda 0.5): boost 1 gave ACC/ASR 87.9 / 2.3,
# boost 4 gave 83.5 / 0.1 and boost 0 (uniform) 91.0 / 75.5; q = max(s, 0) alone cost 1.5 to 10
# points more than boost 4 on three BadNets models.
ACTIVATION_BOOST = 1.0


@dataclass
class Ranking:
    """Neuron scores of one run."""

    source: str  # "activation", "nwc" or "clp"
    ranked: list[int]  # layers whose neurons enter the pruning order
    weights: dict[int, np.ndarray]  # layer -> (neurons,) non-negative fusion marginal weights
    order: list[tuple[int, int]] = field(default_factory=list)  # (layer, neuron), most suspicious first
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (neurons,) raw scores
    clp: dict[int, np.ndarray] | None = None  # CLP's own masks (no ratio)
    unlearning: UnlearnLog | None = None
    target: int | None = None


def ranked_layers(prepared: "PreparedModel", options: CleanOptions) -> list[int]:
    """Layers whose neurons may be pruned (see the module docstring); in the paper's setting conv
    layers only, without residual-shortcut convs."""
    ties, chosen = prepared.ties, []
    for i, layer in enumerate(prepared.layers):
        if i in ties.heads or layer.is_depthwise or layer.is_grouped:
            continue
        if options.experiment.layers == "conv" and layer.op_type not in CONV_OPS:
            continue
        if options.removal.reference and _is_shortcut(prepared, i):
            continue
        chosen.append(i)
    return chosen


def _is_shortcut(prepared: "PreparedModel", i: int) -> bool:
    """A 1x1 conv tied to other layers by a residual add: a projection shortcut."""
    layer = prepared.layers[i]
    return (layer.op_type == "Conv" and all(k == 1 for k in layer.kernel)
            and prepared.ties.groups[i] in prepared.ties.tied_groups())


def activation_ranking(prepared: "PreparedModel", options: CleanOptions, target: int,
                       target_inputs: np.ndarray, other_inputs: np.ndarray) -> Ranking:
    """Target-aware scores from the scan's maximum-margin inputs (see the module docstring)."""
    own = _own_neurons(prepared)
    a_t = mean_activations(prepared, own, target_inputs)
    a_o = mean_activations(prepared, own, other_inputs)
    scores = {i: (a_t[i] - a_o[i]) / np.maximum(a_t[i] + a_o[i], 1e-12) for i in own}
    ranked = ranked_layers(prepared, options)
    return Ranking("activation", ranked, {i: 1.0 + ACTIVATION_BOOST * np.clip(s, 0.0, None) for i, s in scores.items()},
                   nwc_stage.global_ranking({i: scores[i] for i in ranked}), scores, target=target)


def nwc_ranking(prepared: "PreparedModel", options: CleanOptions,
                progress: Callable[[str, int, int], None] | None = None) -> Ranking:
    """The paper's ranking: NWC after random unlearning, compared across layers as the
    experiment's ``nwc_scale`` says."""
    unlearned, log = _unlearn(prepared, options, progress)
    own = _own_neurons(prepared)
    rows = {i: prepared.neurons(i).rows for i in own}
    nwc = {i: nwc_stage.neuron_weight_change(rows[i], to_rows(prepared.layers[i], unlearned[prepared.layers[i].weight]))
           for i in own}
    if not all(np.all(np.isfinite(v)) for v in nwc.values()):
        raise UnsupportedModelError("random unlearning diverged (non-finite weights); lower --lr or --iterations")
    ranked = ranked_layers(prepared, options)
    scale = options.experiment.nwc_scale
    order = nwc_stage.global_ranking({
        i: nwc_stage.scaled_for_ranking(nwc[i], rows[i][0].size, scale) for i in ranked
    })
    return Ranking("nwc", ranked, nwc, order, nwc, unlearning=log)


def clp_ranking(prepared: "PreparedModel", options: CleanOptions) -> Ranking:
    """The CLP baseline: its own masks, no order and no fusion."""
    ranked = ranked_layers(prepared, options)
    masks = clp_masks({i: prepared.neurons(i).rows for i in ranked}, options.experiment.clp_u)
    return Ranking("clp", ranked, {}, clp=masks)


def mean_activations(prepared: "PreparedModel", layers: list[int], x: np.ndarray) -> dict[int, np.ndarray]:
    """Per layer: (neurons,) mean ReLU of each neuron's output over ``x`` (all positions)."""
    module, sums = prepared.module, {i: 0.0 for i in layers}
    rows = [0]
    handles = []
    node_modules = module_names(prepared.loaded.working)
    for i in layers:
        layer = prepared.layers[i]
        # the node's own submodule: a MatMul's weight lives in a buffer container that is never
        # called, so a hook on the weight's owner would never fire
        owner = module.get_submodule(node_modules[layer.node_index])
        axis = 1 if layer.layout in (CONV, CONV_T) else (-2 if layer.layout == OUT_IN and layer.op_type == "MatMul" else -1)
        handles.append(owner.register_forward_hook(_accumulate(sums, i, axis, rows)))
    chunking = prepared.chunking
    try:
        with torch.inference_mode():
            for start, stop in chunking.spans(len(x)):
                rows[0] = stop - start  # the hooks skip the rows that pad a chunk to a fixed batch
                module(torch.from_numpy(np.ascontiguousarray(chunking.pad(x[start:stop]))))
    finally:
        for handle in handles:
            handle.remove()
    return {i: np.asarray(sums[i], dtype=np.float64) / max(len(x), 1) for i in layers}


def _accumulate(sums: dict, i: int, axis: int, rows: list[int]) -> Callable:
    def hook(_module, _inputs, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        out = torch.relu(out.detach()[:rows[0]]).movedim(axis, -1).reshape(out.shape[0], -1, out.shape[axis])
        sums[i] = sums[i] + out.mean(dim=1).sum(dim=0).double().cpu().numpy()

    return hook


def _own_neurons(prepared: "PreparedModel") -> list[int]:
    """Layers with neurons of their own (a depthwise follower moves with its input)."""
    return [i for i in range(len(prepared.layers)) if prepared.ties.roles[i] != FOLLOWER]


def unlearning_micro_batch(prepared: "PreparedModel", options: CleanOptions) -> int | None:
    """--micro-batch as given; else the model's own fixed batch, or what the memory budget holds
    when that is less than --batch-size (None: the whole batch in one pass, as before)."""
    if prepared.chunking.exact:
        return prepared.chunking.size  # a fixed-batch model takes nothing else, --micro-batch or not
    if options.run.micro_batch is not None:
        return options.run.micro_batch
    chosen = prepared.memory.micro_batch if prepared.memory is not None else None
    return chosen if chosen is not None and chosen < options.removal.batch_size else None


def _unlearn(prepared: "PreparedModel", options: CleanOptions, progress) -> tuple[dict[str, np.ndarray], UnlearnLog]:
    experiment, removal = options.experiment, options.removal
    config = UnlearnConfig(
        iterations=removal.iterations, batch_size=removal.batch_size, lr=removal.lr, seed=options.run.seed,
        device=prepared.device, input_range=options.interface.input_range, max_grad_norm=experiment.max_grad_norm,
        max_loss=experiment.max_loss, micro_batch=unlearning_micro_batch(prepared, options),
        exact=prepared.chunking.exact, train_mode=experiment.unlearn_bn == "train",
    )
    tracked = {layer.weight: prepared.refs[layer.weight] for layer in prepared.layers}
    on_step = (lambda step, loss: progress("unlearning", step + 1, removal.iterations)) if progress else None
    loaded = prepared.loaded
    release_memory()  # what the scan freed, before the student, its momentum and the noise batch
    return random_unlearning(prepared.module, tracked, loaded.input_shape, prepared.num_classes, loaded.output_index,
                             loaded.output_is_probability, config, on_step)
