"""The JSON report of one ``clean`` run, and its short human summary.

The report is versioned (``schema``): pipelines parse it, so fields are only added, never
renamed, within a major version.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from importlib import metadata

import numpy as np

from otbr_onnx import nwc as nwc_stage
from otbr_onnx.ties import SOURCE

SCHEMA = "otbr-onnx/report/1"

CHANNEL_TIES = (
    "Layers whose output channels are combined elementwise (residual Add/Sub/Mul, Concat on "
    "other axes) form one group and share one OT plan; a consumer's pruned input channels are "
    "re-expressed with the plans of the layers that produced them (block-diagonal across "
    "Concat, per-channel repeat across Flatten). Where channels reach an op whose channel "
    "mapping is not tracked, or a graph output, the group is pinned to the identity plan. "
    "Depthwise convs follow their input's plan."
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("otbr-onnx", "onnx", "onnxruntime", "onnx2torch", "torch", "pot", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _options(options) -> dict:
    data = dataclasses.asdict(options)
    data["input_range"] = list(options.input_range)
    data["input_shape"] = list(options.input_shape) if options.input_shape else None
    return data


def build_report(*, loaded, options, device, layers, skipped, ties, nwc, masks, record, before, after, log,
                 seconds, num_classes, ranked) -> dict:
    per_layer = []
    for i, layer in enumerate(layers):
        values = nwc.get(i)
        per_layer.append({
            "node": layer.label,
            "op": layer.op_type,
            "weight": layer.weight,
            "neurons": layer.out_channels,
            "role": ties.roles[i],
            "group": ties.groups[i],
            "plan": _plan_of(i, ties, record),
            "ranked": i in ranked,
            "pruned": int(masks[i].sum()) if i in masks else 0,
            "pruned_neurons": np.flatnonzero(masks[i]).tolist() if i in masks else [],
            "fused": i in record.fused,
            "nwc_mean": float(values.mean()) if values is not None else None,
            "nwc_max": float(values.max()) if values is not None else None,
        })
    return {
        "schema": SCHEMA,
        "tool": "otbr-onnx",
        "versions": versions(),
        "command": sys.argv[1:] if sys.argv else [],
        "input": {
            "path": str(loaded.path) if loaded.path else None,
            "sha256": loaded.sha256,
            "input_name": loaded.input_name,
            "input_shape": list(loaded.input_shape),
            "output_name": loaded.output_name,
            "output_is_probability": loaded.output_is_probability,
            "opset": loaded.opset,
            "classes": num_classes,
        },
        "output": {"path": None, "sha256": None},
        "options": _options(options),
        "device": device,
        "layers": per_layer,
        "skipped_layers": [dataclasses.asdict(s) for s in skipped],
        "channel_ties": {
            "how": CHANNEL_TIES,
            "groups": {str(g): [layers[i].label for i in m] for g, m in ties.tied_groups().items()},
            "pinned": {layers[i].label: reason for i, reason in sorted(ties.pin_reasons.items())},
        },
        "nwc": nwc_stage.summary({i: nwc[i] for i in ranked if i in nwc}),
        "pruning": {
            "ratio": options.prune_ratio,
            "ranked_neurons": int(sum(layers[i].out_channels for i in ranked)),
            "pruned_neurons": int(sum(int(m.sum()) for m in masks.values())),
        },
        "fusion": {
            "lambda": options.fusion_lambda,
            "fused_layers": [layers[i].label for i in record.fused],
            "plans": {str(g): p for g, p in record.plans.items()},
        },
        "unlearning": {"loss_first": log.losses[0] if log.losses else None,
                       "loss_last": log.losses[-1] if log.losses else None,
                       "steps": len(log.losses), "stopped_early": log.stopped_early},
        "parity": {"conversion": before.as_dict(), "output": after.as_dict()},
        "seconds": seconds,
    }


def _plan_of(i: int, ties, record) -> str:
    if ties.roles[i] == "follower":
        return "follows input"
    return record.plans.get(ties.groups[i], "not fused" if ties.roles[i] == SOURCE else "identity")


def summary_text(report: dict) -> str:
    """A few lines for stderr."""
    pruning, fusion, par = report["pruning"], report["fusion"], report["parity"]["output"]
    total = sum(report["seconds"].values())
    tied = len(report["channel_ties"]["groups"])
    ratio = "" if pruning["ratio"] is None else f" (ratio {pruning['ratio']})"  # CLP has no ratio
    lines = [
        f"otbr-onnx: {len(report['layers'])} weight layers, {pruning['ranked_neurons']} ranked neurons, "
        f"{tied} tied group(s), {len(report['channel_ties']['pinned'])} pinned layer(s)",
        f"  pruned {pruning['pruned_neurons']} neurons{ratio}, "
        f"fused {len(fusion['fused_layers'])} layers (lambda {fusion['lambda']})",
        f"  parity vs onnxruntime: max abs {par['max_abs']:.2e}, max rel {par['max_rel']:.2e} (ok)",
        f"  {total:.1f}s on {report['device']}",
    ]
    selection = report.get("ratio_selection")
    if selection:
        lines.insert(2, "  " + _selection_text(selection))
    return "\n".join(lines)


def _selection_text(selection: dict) -> str:
    chosen = next(t for t in selection["trials"] if t["ratio"] == selection["chosen_ratio"])
    budget = (f"{selection['budget']:g}% disagreement" if selection["metric"] == "soft agreement"
              else f"{selection['budget']:g} accuracy points")
    return (f"ratio {selection['chosen_ratio']} chosen on {selection['images']} {selection['source']}: "
            f"{selection['metric']} {chosen['score']:.1f}% vs {selection['baseline']:.1f}%, within "
            f"the budget of {budget}")
