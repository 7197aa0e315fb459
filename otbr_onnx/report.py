"""The JSON reports of ``scan`` and ``clean``, assembled once from the stage results, and their
short human summaries.

The report is versioned (``schema``): pipelines parse it, so fields are only added, never
renamed, within a major version. Version 2 adds the scan, the rescan and the verdict, and
drops version 1's ``calibration`` and ``nwc`` fields (``ratio_selection`` and ``ranking`` hold them).
"""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np

from otbr_onnx.ties import FOLLOWER, SOURCE

if TYPE_CHECKING:
    from converters.parity import Parity
    from converters.storage import WriteNotes
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel
    from otbr_onnx.rank import Ranking
    from otbr_onnx.ratio import Selection
    from otbr_onnx.repair import Repair
    from otbr_onnx.detect import ScanResult

SCHEMA = "otbr-onnx/report/2"
UNCHANGED = "no backdoor found by scan: model unchanged"
HISTOGRAM_BINS = 20  # of the ranking's score histogram: enough to see the cut, small in the report

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


def options_dict(options: "CleanOptions") -> dict:
    data = dataclasses.asdict(options)
    data["input_range"] = list(options.input_range)
    data["input_shape"] = list(options.input_shape) if options.input_shape else None
    return data


def _header(prepared: "PreparedModel", options: "CleanOptions", command: list[str] | None) -> dict:
    loaded = prepared.loaded
    return {
        "schema": SCHEMA,
        "tool": "otbr-onnx",
        "versions": versions(),
        "command": list(command or []),
        "input": {
            "path": str(loaded.path) if loaded.path else None,
            "sha256": loaded.sha256,
            "input_name": loaded.input_name,
            "input_shape": list(loaded.input_shape),
            "output_name": loaded.output_name,
            "output_is_probability": loaded.output_is_probability,
            "single_score": loaded.single_score,
            "opset": loaded.opset,
            "classes": prepared.num_classes,
            "batch": loaded.batch.as_dict(),
        },
        "options": options_dict(options),
        "device": prepared.device,
        "storage": storage_summary(prepared),
        "memory": memory_dict(prepared, options),
    }


def storage_summary(prepared: "PreparedModel", notes: "WriteNotes | None" = None) -> dict:
    """Where the weights of the model are stored (``converters.storage``): counts per kind, the
    slots whose storage other nodes read too, and, after a clean, what requantizing needed."""
    from otbr_onnx.emit import PRECISION_GAP_FACTOR, RELATIVE_MARGIN

    store = prepared.loaded.storage
    margin = RELATIVE_MARGIN[store.precision]
    return {
        "counts": store.counts(),
        "shared": dict(sorted(store.shared.items())),
        "precision": store.precision,
        "precision_gap": prepared.precision_gap,
        "parity_rule": (f"tolerance = 1e-4 + {1e-3 + margin:.3g} x max|logit| + {PRECISION_GAP_FACTOR:g} x precision_gap "
                        "(precision_gap: max abs logit difference between the model as stored and its float32 "
                        "working copy, before cleaning); the float32 copy of the written model must match the "
                        "fused module within 1e-4 + 1e-3 x max|logit| (parity.float_copy)"
                        if store.lossy else "tolerance = 1e-4 + 1e-3 x max|logit|"),
        "clipped": notes.clipped if notes is not None else {},
        "new_scales": notes.new_scales if notes is not None else [],
    }


def _layer_storage(prepared: "PreparedModel", layer) -> dict:
    sources = prepared.loaded.storage.sources
    found = {"weight": sources[layer.weight].kind if layer.weight in sources else "initializer"}
    if layer.bias:
        found["bias"] = sources[layer.bias].kind if layer.bias in sources else "initializer"
    if layer.shared_bias:
        found["bias_kept"] = f"'{layer.shared_bias}' is read by other nodes too; left unchanged"
    return found



def memory_dict(prepared: "PreparedModel", options: "CleanOptions") -> dict | None:
    """The memory budget, what one image costs, and the images per pass chosen from them."""
    if prepared.memory is None:
        return None
    from otbr_onnx.rank import unlearning_micro_batch

    return {**prepared.memory.as_dict(), "images_per_pass": prepared.chunking.size,
            "unlearning_micro_batch": unlearning_micro_batch(prepared, options)}


def scan_report(prepared: "PreparedModel", options: "CleanOptions", detection: "ScanResult",
                seconds: dict[str, float], command: list[str] | None) -> dict:
    """The report of ``otbr-onnx scan``."""
    return {**_header(prepared, options, command), "verdict": scan_verdict(detection),
            "scan": detection.as_dict(), "seconds": seconds}


def unchanged_report(prepared: "PreparedModel", options: "CleanOptions", detection: "ScanResult",
                     seconds: dict[str, float], command: list[str] | None) -> dict:
    """The report of a ``clean`` that found nothing and hands the model back unchanged."""
    return {**_header(prepared, options, command), "output": {"path": None, "sha256": None},
            "verdict": unchanged_verdict(detection), "changed": False, "scan": detection.as_dict(), "rescan": None,
            "parity": {"conversion": prepared.conversion_parity.as_dict(), "output": None}, "seconds": seconds}


def clean_report(prepared: "PreparedModel", options: "CleanOptions", detection: "ScanResult | None",
                 ranking: "Ranking", selection: "Selection | None", chosen: "Repair", rescan: "ScanResult | None",
                 after: "Parity", seconds: dict[str, float], command: list[str] | None,
                 notes: "WriteNotes | None" = None, float_copy: "Parity | None" = None) -> dict:
    """The report of a ``clean`` that changed the model."""
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
    log = ranking.unlearning
    return {
        **_header(prepared, options, command),
        "output": {"path": None, "sha256": None},
        "verdict": clean_verdict(detection, rescan, options),
        "changed": True,
        "scan": detection.as_dict() if detection is not None else None,
        "rescan": rescan.as_dict() if rescan is not None else None,
        "ranking": {"source": ranking.source, "target": ranking.target,
                    "summary": _summary({i: ranking.scores[i] for i in ranking.ranked if i in ranking.scores}),
                    "histogram": score_histogram(ranking.scores, ranking.ranked, chosen.masks)},
        "layers": per_layer,
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
            "lambda": options.fusion_lambda if options.method == "otbr" else None,
            "fused_layers": [layers[i].label for i in chosen.record.fused],
            "plans": {str(g): p for g, p in chosen.record.plans.items()},
        },
        "unlearning": None if log is None else {
            "loss_first": log.losses[0] if log.losses else None, "loss_last": log.losses[-1] if log.losses else None,
            "steps": len(log.losses), "stopped_early": log.stopped_early},
        "ratio_selection": selection.as_dict() if selection is not None else None,
        "parity": {"conversion": prepared.conversion_parity.as_dict(), "output": after.as_dict(),
                   **({"float_copy": float_copy.as_dict()} if float_copy is not None else {})},
        "storage": storage_summary(prepared, notes),
        "seconds": seconds,
    }


def removal_report(prepared: "PreparedModel", options: "CleanOptions", detection: "ScanResult | None",
                   removal, rescan: "ScanResult | None", after: "Parity", seconds: dict[str, float],
                   command: list[str] | None, notes: "WriteNotes | None", float_copy: "Parity | None",
                   images) -> dict:
    """The report of a ``clean`` whose remover was adversarial unlearning on the user's images."""
    targets = removal.log.targets
    verdict = (f"backdoor suspected (class {', '.join(map(str, targets))}): triggers found on the user's images "
               f"unlearnt (held-out reach {removal.log.rounds[removal.log.chosen - 1].worst_reach:.0f}%)"
               if targets else "no class suspected: cleaned anyway (--always), untargeted unlearning")
    others = [c for c in (rescan.suspected if rescan is not None else []) if c not in targets]
    if others:  # not the target, but a class the same test flags in the model handed back
        verdict += f"; the rescan flags class {', '.join(map(str, others))}: evaluate before deploying"
    return {
        **_header(prepared, options, command),
        "output": {"path": None, "sha256": None},
        "verdict": verdict,
        "changed": True,
        "scan": detection.as_dict() if detection is not None else None,
        "rescan": rescan.as_dict() if rescan is not None else None,
        "data": {"source": images.source, "images": int(len(images.x)), "labelled": images.y is not None,
                 "notes": list(images.notes)},
        "removal": removal.as_dict(),
        "parity": {"conversion": prepared.conversion_parity.as_dict(), "output": after.as_dict(),
                   **({"float_copy": float_copy.as_dict()} if float_copy is not None else {})},
        "storage": storage_summary(prepared, notes),
        "seconds": seconds,
    }


def as_written(report: dict, path, sha256: str, extra: dict | None = None) -> dict:
    """``report`` once its model is written: the output's path and sha256, and what the writer adds
    (batch mode: the options key that makes a rerun skip the model). A new dict."""
    return {**report, "output": {"path": str(path), "sha256": sha256}, **(extra or {})}


def batch_facts(report: dict) -> dict:
    """What batch mode shows of a scan or clean report, one table row: the scan's verdict, the
    suspected classes, the prune ratio of a changed model and the chosen ratio's fidelity."""
    found = report.get("scan")
    verdict = ("not scanned" if found is None else "inconclusive" if found.get("inconclusive")
               else "suspected" if found["suspected_targets"] else "none found")
    pruning = report.get("pruning") if report.get("changed") else None
    selection = report.get("ratio_selection") if pruning else None
    chosen = next((t for t in selection["trials"] if t["ratio"] == selection["chosen_ratio"]), None) \
        if selection else None
    return {"verdict": verdict, "targets": tuple(found["suspected_targets"]) if found else (),
            "gamma": pruning["ratio"] if pruning else None,
            "fidelity": chosen["score"] if chosen else None,
            "fidelity_metric": selection["metric"] if chosen else None}


def unchanged_verdict(detection: "ScanResult") -> str:
    if detection.inconclusive:
        return f"scan inconclusive ({detection.inconclusive}): model unchanged; --always cleans it anyway"
    return UNCHANGED


def scan_verdict(detection: "ScanResult") -> str:
    if detection.inconclusive:
        return f"scan inconclusive ({detection.inconclusive}): nothing suspected, nothing ruled out"
    if not detection.suspected:
        return "no backdoor found"
    classes = ", ".join(str(c) for c in detection.suspected)
    return f"backdoor suspected: target class {classes}"


def clean_verdict(detection: "ScanResult | None", rescan: "ScanResult | None", options: "CleanOptions") -> str:
    if detection is None:
        return "cleaned with the published method (no scan)"
    if detection.inconclusive:
        return f"scan inconclusive ({detection.inconclusive}): cleaned anyway (--always)"
    if not detection.suspected:
        return "no backdoor found by scan: cleaned anyway (--always)"
    target = detection.suspected[0]
    if rescan is not None and not rescan.cleared(target):  # only with a fixed --prune-ratio: the rule refuses
        return f"backdoor suspected (class {target}): the rescan still flags it at --prune-ratio {options.prune_ratio}"
    # "cleaned", not "removed": the rescan is a proxy (see detect.CLEARED_Z and the README's limits)
    verdict = (f"backdoor suspected (class {target}): cleaned until the rescan no longer flags it "
               f"(z {rescan.z[target]:.1f}); the rescan is a proxy, not a proof")
    others = [c for c in rescan.suspected if c != target]
    if others:  # the same test as `scan` of the written file: say what it will report
        verdict += (f"; the rescan flags class {', '.join(map(str, others))}, which a scan of the written file "
                    f"reports too: evaluate before deploying")
    return verdict


def _plan_of(i: int, ties, chosen: "Repair") -> str:
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


def margins_text(detection: dict, title: str = "scan") -> list[str]:
    """Per-class maximum margins and z-scores, suspected classes marked."""
    suspected = set(detection["suspected_targets"])
    lines = [f"  {title}: {detection['verdict']} (robust z > {detection['threshold']:g} flags a class)"]
    for row in detection["classes"]:
        mark = "  <- suspected" if row["class"] in suspected else ""
        lines.append(f"    class {row['class']:4d}  max margin {row['max_margin']:9.2f}  z {row['z']:7.2f}{mark}")
    evidence = detection.get("evidence")
    if evidence is not None:
        lines.append(f"    max-margin test flags {evidence['max_margin'] or 'nothing'}")
    inversion = detection.get("inversion")
    if inversion:
        lines += inversion_text(inversion)
    if detection.get("sees"):
        lines.append(f"    sees: {detection['sees']}")
    return lines


def inversion_text(inversion: dict) -> list[str]:
    """Per class, per trigger family: the share of images a small trigger sends there and its z."""
    families = list(inversion["thresholds"])
    thresholds = ", ".join(f"{f} {inversion['thresholds'][f]:g}" for f in families)
    lines = [f"    trigger inversion on {inversion['images']} images (z above {thresholds} flags a class): "
             f"flags {inversion['suspected_targets'] or 'nothing'}"]
    for row in inversion["classes"]:
        cells = "  ".join(f"{f} {row[f]['flipped'] * 100:5.1f}% z {row[f]['z']:6.2f}" for f in families)
        mark = "  <- " + ", ".join(inversion["evidence"][str(row["class"])]) \
            if str(row["class"]) in inversion["evidence"] else ""
        lines.append(f"    class {row['class']:4d}  {cells}{mark}")
    return lines


def summary_text(report: dict) -> str:
    """A few lines for stderr."""
    lines = [f"otbr-onnx: {report['verdict']}"]
    total = sum(report["seconds"].values())
    if not report.get("changed", True):
        lines.append(f"  {total:.1f}s on {report['device']}")
        return "\n".join(lines)
    pruning, fusion, par = report["pruning"], report["fusion"], report["parity"]["output"]
    ratio = "" if pruning["ratio"] is None else f" (ratio {pruning['ratio']})"  # CLP has no ratio
    fused = f", fused {len(fusion['fused_layers'])} layers (lambda {fusion['lambda']})" if fusion["lambda"] is not None else ""
    lines += [
        f"  {len(report['layers'])} weight layers, {pruning['ranked_neurons']} ranked neurons "
        f"({report['ranking']['source']} score), {len(report['channel_ties']['groups'])} tied group(s), "
        f"{len(report['channel_ties']['pinned'])} pinned layer(s)",
        f"  pruned {pruning['pruned_neurons']} neurons{ratio}{fused}",
    ]
    selection = report.get("ratio_selection")
    if selection:
        lines.append("  " + _selection_text(selection))
    for key, title in (("scan", "before"), ("rescan", "after")):
        if report.get(key) is not None:
            top = max(report[key]["classes"], key=lambda row: row["z"])
            lines.append(f"  {title}: largest z {top['z']:.1f} (class {top['class']}), "
                         f"flagged {report[key]['suspected_targets'] or 'none'}")
    lines += _storage_lines(report.get("storage"))
    lines += [f"  parity vs onnxruntime: max abs {par['max_abs']:.2e}, max rel {par['max_rel']:.2e} (ok"
              + (f", {report['storage']['precision']} tolerance {par['tolerance']:.2e})" if par.get("allowance") else ")"),
              f"  {total:.1f}s on {report['device']}"]
    return "\n".join(lines)


def _storage_lines(storage: dict | None) -> list[str]:
    """Where the weights went back, when that was anything but float32 initializers."""
    if not storage or set(storage["counts"]) <= {"initializer"}:
        return []
    lines = ["  weights written back into: " + ", ".join(f"{n} {kind}" for kind, n in sorted(storage["counts"].items()))]
    if storage["clipped"]:
        lines.append(f"  int8 clipping: {sum(storage['clipped'].values())} element(s) in {len(storage['clipped'])} tensor(s)")
    if storage["new_scales"]:
        lines.append(f"  new weight scales: {', '.join(storage['new_scales'])}")
    return lines


def _selection_text(selection: dict) -> str:
    chosen = next(t for t in selection["trials"] if t["ratio"] == selection["chosen_ratio"])
    budget = (f"{selection['budget']:g}% disagreement" if selection["metric"] == "soft agreement"
              else f"{selection['budget']:g} accuracy points")
    return (f"ratio {selection['chosen_ratio']} chosen on {selection['images']} {selection['source']} "
            f"({selection['rule']}): {selection['metric']} {chosen['score']:.1f}% vs {selection['baseline']:.1f}%, "
            f"within the budget of {budget}")
