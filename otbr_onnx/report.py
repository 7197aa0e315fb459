"""The JSON reports of ``scan`` and ``clean``, assembled once from the stage results, and their
short human summaries.

The report is versioned (``schema``): pipelines parse it, so fields are only added, never
renamed, within a major version. Version 2 adds the scan, the rescan and the verdict, and
drops version 1's ``calibration`` and ``nwc`` fields (``ratio_selection`` and ``ranking`` hold them);
later 2.x reports add ``remover`` (any remover's name, strength and fidelity) and each trial's
``strength`` (``ratio`` repeats it for earlier readers). Version 3 writes ``options`` by group, as
``CleanOptions`` holds them (``options.removal.prune_ratio`` was ``options.prune_ratio``); the
rest is as in 2.x, so the HTML page renders both (``READABLE``).

A clean report is the stage results' ``as_dict()`` in stage order (``clean_report``); the remover
adds its own sections (``removers.base.Removal.as_dict``).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converters.storage import WriteNotes
    from otbr_onnx.detect import ScanResult
    from otbr_onnx.emit import Written
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel
    from otbr_onnx.removers.base import Removal

SCHEMA = "otbr-onnx/report/3"
READABLE = ("otbr-onnx/report/2", SCHEMA)  # what `otbr-onnx report` renders: it reads no option
UNCHANGED = "no backdoor found by scan: model unchanged"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("otbr-onnx", "onnx", "onnxruntime", "onnx2torch", "torch", "pot", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def options_dict(options: "CleanOptions") -> dict:
    """Every option, by group as in ``CleanOptions``."""
    data = dataclasses.asdict(options)
    interface = options.interface
    data["interface"]["input_range"] = list(interface.input_range)
    data["interface"]["input_shape"] = list(interface.input_shape) if interface.input_shape else None
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


def unsanitized_report(prepared: "PreparedModel", options: "CleanOptions", detection: "ScanResult", why: str,
                       seconds: dict[str, float], command: list[str] | None) -> dict:
    """The report of a ``clean --data`` whose scan found nothing and whose sanitization the remover
    refused (its fidelity budget): the model is handed back unchanged, and the report says why."""
    report = unchanged_report(prepared, options, detection, seconds, command)
    return {**report, "verdict": f"{report['verdict']}; not sanitized: {why}",
            "sanitization": {"remover": options.resolved_remover, "refused": why}}


def clean_report(prepared: "PreparedModel", options: "CleanOptions", verdict: str, results: Mapping[str, Any],
                 written: "Written", seconds: dict[str, float], command: list[str] | None) -> dict:
    """The report of a ``clean`` that changed the model: the header and ``verdict``, then one
    section per entry of ``results`` in its order (a stage result's ``as_dict()``; None stays
    null; a plain dict as it is), then the written model's parity and storage. A new stage adds
    an entry, not a parameter."""
    return {
        **_header(prepared, options, command),
        "output": {"path": None, "sha256": None},
        "verdict": verdict,
        "changed": True,
        **{key: _section(value) for key, value in results.items()},
        "parity": {"conversion": prepared.conversion_parity.as_dict(), **written.as_dict()},
        "storage": storage_summary(prepared, written.notes),
        "seconds": seconds,
    }


def removal_sections(name: str, removal: "Removal") -> dict[str, Any]:
    """A removal's sections: ``remover`` (what any remover reports: its name, the strength kept
    and its fidelity; what the batch table shows), then the remover's own."""
    fidelity = removal.fidelity
    return {"remover": {"name": name, "strength": removal.strength,
                        "fidelity": fidelity[0] if fidelity is not None else None,
                        "fidelity_metric": fidelity[1] if fidelity is not None else None},
            **removal.as_dict()}


def _section(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def as_written(report: dict, path, sha256: str, extra: dict | None = None) -> dict:
    """``report`` once its model is written: the output's path and sha256, and what the writer adds
    (batch mode: the options key that makes a rerun skip the model). A new dict."""
    return {**report, "output": {"path": str(path), "sha256": sha256}, **(extra or {})}


def batch_facts(report: dict) -> dict:
    """What batch mode shows of a scan or clean report, one table row: the scan's verdict, the
    suspected classes, the strength a changed model was cleaned at and its fidelity."""
    found = report.get("scan")
    verdict = ("not scanned" if found is None else "inconclusive" if found.get("inconclusive")
               else "suspected" if found["suspected_targets"] else "none found")
    remover = (report.get("remover") or {}) if report.get("changed") else {}
    return {"verdict": verdict, "targets": tuple(found["suspected_targets"]) if found else (),
            "strength": remover.get("strength"), "fidelity": remover.get("fidelity"),
            "fidelity_metric": remover.get("fidelity_metric")}


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
    par = report["parity"]["output"]
    if report.get("pruning") is not None:  # the pruning remover's sections
        lines += _pruning_lines(report)
    after = "rescan" if report.get("rescan") is not None else "final_scan"
    for key, title in (("scan", "before"), (after, "after")):
        if report.get(key) is not None:
            top = max(report[key]["classes"], key=lambda row: row["z"])
            lines.append(f"  {title}: largest z {top['z']:.1f} (class {top['class']}), "
                         f"flagged {report[key]['suspected_targets'] or 'none'}")
    removal = report.get("removal") or {}
    if removal.get("remover") == "relearning" and removal.get("kept"):
        kept = removal["kept"]
        lines.append(f"  held-out images ({removal['images']['holdout']}): {kept['agreement']:.1f}% answered as the "
                     f"original, expected accuracy cost {kept['expected_accuracy_drop']:.1f} points")
    residual = removal.get("residual")
    if residual is not None:
        lines.append(f"  relearnt model's scan: flagged {residual['rescan_after_relearning'] or 'none'}"
                     + (f", unlearnt (expected accuracy cost {residual['expected_accuracy_drop']:.1f} points in all)"
                        if residual["unlearnt"] else f" ({residual['skipped']})"))
    lines += _storage_lines(report.get("storage"))
    lines += [f"  parity vs onnxruntime: max abs {par['max_abs']:.2e}, max rel {par['max_rel']:.2e} (ok"
              + (f", {report['storage']['precision']} tolerance {par['tolerance']:.2e})" if par.get("allowance") else ")"),
              f"  {total:.1f}s on {report['device']}"]
    return "\n".join(lines)


def _pruning_lines(report: dict) -> list[str]:
    """What the pruning remover ranked, pruned and fused, and how its strength was chosen."""
    pruning, fusion = report["pruning"], report["fusion"]
    ratio = "" if pruning["ratio"] is None else f" (ratio {pruning['ratio']})"  # CLP has no ratio
    fused = f", fused {len(fusion['fused_layers'])} layers (lambda {fusion['lambda']})" if fusion["lambda"] is not None else ""
    lines = [
        f"  {len(report['layers'])} weight layers, {pruning['ranked_neurons']} ranked neurons "
        f"({report['ranking']['source']} score), {len(report['channel_ties']['groups'])} tied group(s), "
        f"{len(report['channel_ties']['pinned'])} pinned layer(s)",
        f"  pruned {pruning['pruned_neurons']} neurons{ratio}{fused}",
    ]
    selection = report.get("ratio_selection")
    if selection:
        lines.append("  " + _selection_text(selection))
    return lines


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
    chosen = next(t for t in selection["trials"] if t["strength"] == selection["chosen_strength"])
    budget = (f"{selection['budget']:g}% disagreement" if selection["metric"] == "soft agreement"
              else f"{selection['budget']:g} accuracy points")
    return (f"ratio {selection['chosen_strength']} chosen on {selection['images']} {selection['source']} "
            f"({selection['rule']}): {selection['metric']} {chosen['score']:.1f}% vs {selection['baseline']:.1f}%, "
            f"within the budget of {budget}")
