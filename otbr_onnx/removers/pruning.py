"""The pruning remover: rank the neurons, prune the top of the ranking and fuse the pruned model
into the original with optimal transport (OTBR), at the strength the rescan and the fidelity
budget choose.

    rank     (rank.py)    target-aware activation score, or NWC after random unlearning
    select   (ratio.py)   candidates pruned and fused (repair.py), each checked for fidelity and
                          rescanned; the smallest one the rescan clears is kept (nothing
                          suspected, ``always``: the largest within the fidelity budget)
    rescan   (detect.py)  the chosen candidate's rescan, or a new one

(A fixed ``prune_ratio`` without calibration images, or ``method="clp"``, skips the choice.)

The strength of a candidate is its prune ratio (gamma). The activation ranking is the one place
that reads the margin scan's own fields (its maximisers): it needs inputs that reach the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from otbr_onnx.detect import ScanResult, rescan_prepared
from otbr_onnx.rank import Ranking, activation_ranking, clp_ranking, nwc_ranking
from otbr_onnx.ratio import Selection, select
from otbr_onnx.removers.base import Progress
from otbr_onnx.repair import Repair, repair
from otbr_onnx.ties import FOLLOWER, SOURCE

if TYPE_CHECKING:
    from otbr_onnx.data import Images
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel
    from otbr_onnx.timing import Timer

HISTOGRAM_BINS = 20  # of the ranking's score histogram: enough to see the cut, small in the report

CHANNEL_TIES = (
    "Layers whose output channels are combined elementwise (residual Add/Sub/Mul, Concat on "
    "other axes) form one group and share one OT plan; a consumer's pruned input channels are "
    "re-expressed with the plans of the layers that produced them (block-diagonal across "
    "Concat, per-channel repeat across Flatten). Where channels reach an op whose channel "
    "mapping is not tracked, or a graph output, the group is pinned to the identity plan. "
    "Depthwise convs follow their input's plan."
)


@dataclass(frozen=True)
class PruningRemover:
    """Pruning + OT fusion as a ``removers.base.Remover``."""

    name: str = "pruning"

    def remove(self, prepared: "PreparedModel", detection: ScanResult | None, images: "Images | None",
               options: "CleanOptions", progress: Progress | None, timer: "Timer") -> "PruningRemoval":
        with timer.stage("ranking"):
            ranking = rank(prepared, options, detection, progress)
        with timer.stage("ratio_selection" if selects_ratio(options, ranking) else "repair"):
            selection, chosen = choose(prepared, ranking, options, detection, progress, images)
        with timer.stage("rescan"):
            rescan = verify_removal(prepared, chosen, selection, detection, options)
        return PruningRemoval(ranking, selection, chosen, rescan, prepared, options)


@dataclass
class PruningRemoval:
    """The ranking, how the strength was chosen, the kept candidate and its rescan."""

    ranking: Ranking
    selection: Selection | None
    chosen: Repair
    rescan: ScanResult | None
    prepared: "PreparedModel" = field(repr=False)  # the layers and ties the report describes
    options: "CleanOptions" = field(repr=False)

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.chosen.weights

    @property
    def strength(self) -> float | None:
        return self.chosen.ratio

    @property
    def fidelity(self) -> tuple[float, str] | None:
        trial = self.selection.chosen_trial if self.selection is not None else None
        return None if trial is None else (trial.score, self.selection.metric)

    @property
    def pruned(self) -> dict[str, int]:
        layers = self.prepared.layers
        return {layers[i].label: int(m.sum()) for i, m in self.chosen.masks.items() if m.any()}

    def verdict(self, detection: ScanResult | None, options: "CleanOptions") -> str:
        return clean_verdict(detection, self.rescan, options)

    def as_dict(self) -> dict:
        prepared, ranking, chosen, options = self.prepared, self.ranking, self.chosen, self.options
        layers, ties = prepared.layers, prepared.ties
        log = ranking.unlearning
        return {
            "ranking": {"source": ranking.source, "target": ranking.target,
                        "summary": _summary({i: ranking.scores[i] for i in ranking.ranked if i in ranking.scores}),
                        "histogram": score_histogram(ranking.scores, ranking.ranked, chosen.masks)},
            "layers": layers_dict(prepared, ranking, chosen),
            "skipped_layers": [dataclasses.asdict(s) for s in prepared.skipped],
            "channel_ties": {
                "how": CHANNEL_TIES,
                "groups": {str(g): [layers[i].label for i in m] for g, m in ties.tied_groups().items()},
                "pinned": {layers[i].label: reason for i, reason in sorted(ties.pin_reasons.items())},
            },
            "pruning": {
                "ratio": chosen.ratio,
                "ranked_neurons": int(sum(layers[i].out_channels for i in ranking.ranked)),
                "pruned_neurons": chosen.pruned,
            },
            "fusion": {
                "lambda": options.removal.fusion_lambda if options.removal.method == "otbr" else None,
                "fused_layers": [layers[i].label for i in chosen.record.fused],
                "plans": {str(g): p for g, p in chosen.record.plans.items()},
            },
            "unlearning": None if log is None else {
                "loss_first": log.losses[0] if log.losses else None,
                "loss_last": log.losses[-1] if log.losses else None,
                "steps": len(log.losses), "stopped_early": log.stopped_early},
            "ratio_selection": self.selection.as_dict() if self.selection is not None else None,
        }


def rank(prepared: "PreparedModel", options: "CleanOptions", detection: ScanResult | None,
         progress: Progress | None = None) -> Ranking:
    """The neuron scores ``options.removal.ranking`` asks for (``auto``: activation given a suspect)."""
    if options.removal.method == "clp":
        return clp_ranking(prepared, options)
    ranking = options.removal.ranking
    wants_target = ranking == "activation" or (ranking == "auto" and detection is not None
                                               and bool(detection.suspected))
    if not wants_target:
        return nwc_ranking(prepared, options, progress)
    target = detection.suspected[0] if detection.suspected else detection.top_class
    others = [detection.inputs[c] for c in detection.refined if c != target]
    return activation_ranking(prepared, options, target, detection.inputs[target], _stack(others))


def choose(prepared: "PreparedModel", ranking: Ranking, options: "CleanOptions", detection: ScanResult | None,
           progress: Progress | None = None, images: "Images | None" = None) -> tuple[Selection | None, Repair]:
    """A fixed ratio (or CLP's own masks) as given, else the ratio rule of ``ratio.py``."""
    if not selects_ratio(options, ranking):
        return None, repair(prepared, ranking, options.removal.prune_ratio, options)
    selection = select(prepared, ranking, options, detection, progress, images)
    return selection, selection.chosen


def selects_ratio(options: "CleanOptions", ranking: Ranking) -> bool:
    """Whether gamma is chosen per model: not for CLP (its own masks) nor a fixed --prune-ratio
    (calibration images always decide it)."""
    return ranking.source != "clp" and (options.removal.prune_ratio is None or options.data.calibration is not None)


def verify_removal(prepared: "PreparedModel", chosen: Repair, selection: Selection | None,
                   detection: ScanResult | None, options: "CleanOptions") -> ScanResult | None:
    """The rescan of the model handed back: the chosen trial's, or a new one."""
    if detection is None:
        return None
    trial = selection.chosen_trial if selection is not None else None
    if trial is not None and trial.rescan is not None:
        return trial.rescan
    return rescan_prepared(prepared, prepared.with_weights(chosen.weights), detection, options)


def clean_verdict(detection: ScanResult | None, rescan: ScanResult | None, options: "CleanOptions") -> str:
    """The verdict of a pruning removal: what the scan found and what the rescan says now."""
    if detection is None:
        return "cleaned with the published method (no scan)"
    if detection.inconclusive:
        return f"scan inconclusive ({detection.inconclusive}): cleaned anyway (--always)"
    if not detection.suspected:
        return "no backdoor found by scan: cleaned anyway (--always)"
    target = detection.suspected[0]
    if rescan is not None and not rescan.cleared(target):  # only with a fixed --prune-ratio: the rule refuses
        return (f"backdoor suspected (class {target}): the rescan still flags it at --prune-ratio "
                f"{options.removal.prune_ratio}")
    # "cleaned", not "removed": the rescan is a proxy (see detectors.margin.CLEARED_Z and the README's limits)
    # what a scan of the model handed back flags besides is the pipeline's final scan to say
    return (f"backdoor suspected (class {target}): cleaned until the rescan no longer flags it "
            f"(z {rescan.statistic(target):.1f}); the rescan is a proxy, not a proof")


def layers_dict(prepared: "PreparedModel", ranking: Ranking, chosen: Repair) -> list[dict]:
    """Per weight layer: its tie, whether it was ranked, pruned and fused, its scores and storage."""
    layers, ties = prepared.layers, prepared.ties
    ranked = set(ranking.ranked)
    per_layer = []
    for i, layer in enumerate(layers):
        values = ranking.scores.get(i)
        mask = chosen.masks.get(i)
        per_layer.append({
            "node": layer.label,
            "op": layer.op_type,
            "weight": layer.weight,
            "neurons": layer.out_channels,
            "role": str(ties.roles[i]),
            "group": ties.groups[i],
            "plan": _plan_of(i, ties, chosen),
            "ranked": i in ranked,
            "pruned": int(mask.sum()) if mask is not None else 0,
            "pruned_neurons": np.flatnonzero(mask).tolist() if mask is not None else [],
            "fused": i in chosen.record.fused,
            "score_mean": float(values.mean()) if values is not None and values.size else None,
            "score_max": float(values.max()) if values is not None and values.size else None,
            "storage": _layer_storage(prepared, layer),
        })
    return per_layer


def _layer_storage(prepared: "PreparedModel", layer) -> dict:
    sources = prepared.loaded.storage.sources
    found = {"weight": sources[layer.weight].kind if layer.weight in sources else "initializer"}
    if layer.bias:
        found["bias"] = sources[layer.bias].kind if layer.bias in sources else "initializer"
    if layer.shared_bias:
        found["bias_kept"] = f"'{layer.shared_bias}' is read by other nodes too; left unchanged"
    return found


def _plan_of(i: int, ties, chosen: Repair) -> str:
    if ties.roles[i] == FOLLOWER:
        return "follows input"
    return chosen.record.plans.get(ties.groups[i], "not fused" if ties.roles[i] == SOURCE else "identity")


def _summary(scores: dict[int, np.ndarray]) -> dict[str, float]:
    values = np.concatenate(list(scores.values())) if scores else np.zeros(0)
    if values.size == 0:
        return {"neurons": 0}
    return {"neurons": int(values.size), "min": float(values.min()), "median": float(np.median(values)),
            "mean": float(values.mean()), "max": float(values.max()), "zero": int(np.sum(values == 0))}


def score_histogram(scores: dict[int, np.ndarray], ranked: list[int], masks: dict[int, np.ndarray],
                    bins: int = HISTOGRAM_BINS) -> dict | None:
    """The ranked neurons' scores as one histogram split into kept and pruned neurons, and the
    cut: the lowest score that was pruned. A reviewer sees where the pruning cut fell without the
    full score vectors (thousands of numbers on a real model). None where nothing was scored (CLP).

    The pruning order can differ from the raw score order (``Experiment.nwc_scale`` scales NWC
    per layer), so kept and pruned bins may overlap around the cut."""
    layers = [i for i in ranked if i in scores and scores[i].size]
    if not layers:
        return None
    values = np.concatenate([np.asarray(scores[i], dtype=np.float64) for i in layers])
    pruned = np.concatenate([masks[i] if i in masks else np.zeros(scores[i].size, bool) for i in layers])
    edges = np.histogram_bin_edges(values, bins)
    return {"edges": [float(e) for e in edges],
            "kept": np.histogram(values[~pruned], edges)[0].tolist(),
            "pruned": np.histogram(values[pruned], edges)[0].tolist(),
            "cut": float(values[pruned].min()) if pruned.any() else None}


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0,))


REMOVER = PruningRemover()
