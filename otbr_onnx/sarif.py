"""SARIF 2.1.0 logs of ``scan`` and ``clean``, for code-scanning dashboards (GitHub, GitLab, Azure).

Built from the plain JSON reports (``report.py``) and, for models without a report (refused,
failed), their error message and exit code: one result per model and finding, located at the
model file, and one invocation with the command line and the exit code. The CLI writes the log
before it exits, so a gate that stops on a non-zero exit code still has the findings to upload.

Every string from a model (node names in a refusal, paths) is carried as JSON data: ``json.dumps``
escapes control characters, and the SARIF consumer decides how to show it.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
# exit codes after which the tool did not finish its check: an internal error, bad usage or an
# unreadable model, Ctrl-C. The others (0, 3 refused, 4 parity, 6 suspected) are verdicts.
UNSUCCESSFUL_EXITS = (1, 2, 130)
EXIT_MEANINGS = {0: "ok", 1: "internal error", 2: "bad usage or unreadable model", 3: "model refused",
                 4: "parity failure", 5: "verify found a difference", 6: "backdoor suspected", 130: "interrupted"}


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    level: str  # SARIF's "error", "warning" or "note"
    short: str
    full: str


RULES = (
    Rule("OTBR001", "backdoor-suspected", "error", "A backdoor is suspected",
         "The maximum-margin scan found a class whose maximum margin stands out against the other classes' "
         "(robust z above the threshold), or, with --data, trigger inversion on the user's images found a class "
         "a small patch, additive or warp trigger reaches abnormally easily: the model likely carries a backdoor "
         "serving that class."),
    Rule("OTBR002", "backdoor-cleaned", "warning", "A suspected backdoor was cleaned",
         "The scan suspected a backdoor; clean removed it (pruning + OT fusion, or adversarial unlearning on "
         "--data images) until a rescan no longer flagged the class, and wrote the cleaned model. The rescan "
         "is a proxy, not a proof: review before deploying."),
    Rule("OTBR003", "model-refused", "error", "The model was refused",
         "The model cannot be handled safely (unsupported operator or structure, or no candidate of the remover "
         "removed the backdoor within the fidelity budget); nothing was written."),
    Rule("OTBR004", "parity-failure", "error", "The cleaned model failed the onnxruntime parity check",
         "The weights written back into the original graph did not reproduce the cleaned network's outputs "
         "in onnxruntime; nothing was written."),
    Rule("OTBR005", "no-backdoor-found", "note", "No backdoor found",
         "The scan found no class whose maximum margin stands out (nor, with --data, any class a small trigger "
         "reaches abnormally easily); clean hands such a model back unchanged. The data-free scan misses most "
         "global triggers (Blended, SIG, WaNet): see the 'sees' property."),
    Rule("OTBR006", "cleaned-without-suspicion", "note", "Cleaned without a suspected backdoor",
         "The model was cleaned although the scan flagged nothing (--always) or was not run (--reference)."),
    Rule("OTBR007", "model-not-checked", "error", "The model could not be checked",
         "The model could not be read or processed (unreadable file, bad input, internal error)."),
)
RULE = {rule.name: rule for rule in RULES}


def artifact_uri(path: str | Path) -> str:
    """A SARIF artifact URI: a relative path stays relative (code scanning resolves it against
    the repository root), an absolute one becomes a ``file://`` URI; both percent-encoded."""
    path = Path(path)
    if path.is_absolute():
        return "file://" + quote(path.as_posix())
    return quote(path.as_posix())


def _location(path: str | Path) -> dict:
    # a model file has no lines, but GitHub code scanning shows a result only with a region that
    # has at least startLine (its SARIF rule GH1003): line 1 stands for the whole file
    return {"physicalLocation": {"artifactLocation": {"uri": artifact_uri(path)}, "region": {"startLine": 1}}}


def result(rule_name: str, model: str | Path, message: str, properties: dict | None = None,
           related: list[tuple[str, str]] | None = None, sha256: str | None = None) -> dict:
    """One SARIF result of ``rule_name`` at ``model``; ``related``: (path, description) pairs
    such as the cleaned output; ``sha256`` of the model fingerprints the finding across runs."""
    rule = RULE[rule_name]
    out = {"ruleId": rule.id, "ruleIndex": RULES.index(rule), "level": rule.level,
           "message": {"text": message}, "locations": [_location(model)]}
    if related:
        out["relatedLocations"] = [{**_location(path), "id": i, "message": {"text": text}}
                                   for i, (path, text) in enumerate(related)]
    if sha256:
        out["partialFingerprints"] = {"modelSha256/v1": sha256}
    if properties:
        out["properties"] = properties
    return out


def _model(report: dict, fallback: str | Path | None) -> str:
    return report.get("input", {}).get("path") or str(fallback or "model.onnx")


def _finite(value: float) -> float | None:
    """None for NaN and infinities, which strict JSON (and so SARIF) has no literal for."""
    return value if math.isfinite(value) else None


def _scan_properties(detection: dict | None) -> dict:
    if detection is None:
        return {}
    rows = [row for row in detection["classes"] if math.isfinite(row["z"])]
    top = max(rows, key=lambda row: row["z"]) if rows else None
    extra = {}
    if detection.get("evidence") is not None:
        extra["evidence"] = detection["evidence"]
    if detection.get("sees"):
        extra["sees"] = detection["sees"]
    return {"suspectedTargets": detection["suspected_targets"], "threshold": _finite(detection["threshold"]),
            **({"largestZ": top["z"], "largestZClass": top["class"]} if top else {}), **extra}


def scan_results(report: dict, model: str | Path | None = None) -> list[dict]:
    """The findings of a scan report: backdoor suspected (error) or none found (note)."""
    detection, path, sha = report["scan"], _model(report, model), report.get("input", {}).get("sha256")
    properties = {"verdict": report["verdict"], **_scan_properties(detection)}
    name = "backdoor-suspected" if detection["suspected_targets"] else "no-backdoor-found"
    return [result(name, path, f"{path}: {report['verdict']}", properties, sha256=sha)]


def clean_results(report: dict, model: str | Path | None = None) -> list[dict]:
    """The findings of a clean report: cleaned (warning), cleaned without suspicion or unchanged
    (note), and, where the rescan of the written model still flags a class, backdoor suspected."""
    path, sha = _model(report, model), report.get("input", {}).get("sha256")
    output = (report.get("output") or {}).get("path")
    # the fresh scan of the written model where the report has one (what `scan` of it reports, and
    # what the exit code rests on), else the remover's rescan (reports written before it existed)
    detection, rescan = report.get("scan"), report.get("final_scan") or report.get("rescan")
    properties = {"verdict": report["verdict"], "changed": report.get("changed", True), **_scan_properties(detection)}
    if report.get("remover"):  # any remover: its name and the strength it kept
        properties["remover"] = report["remover"]["name"]
        properties["strength"] = report["remover"]["strength"]
    if report.get("pruning"):
        properties["pruneRatio"] = report["pruning"]["ratio"]
        properties["prunedNeurons"] = report["pruning"]["pruned_neurons"]
    if rescan is not None:
        properties["rescanSuspectedTargets"] = rescan["suspected_targets"]
    removal = report.get("removal") or {}
    kept, residual = removal.get("kept"), removal.get("residual") or {}
    if kept:  # relearning: how close the model handed back stays to the original on held-out images
        properties["heldOutAgreement"] = kept["agreement"]
        properties["expectedAccuracyCost"] = kept["expected_accuracy_drop"]
    if residual.get("unlearnt"):  # then unlearning on the relearnt model: the handed-back model's own figures
        properties["heldOutAgreement"] = residual["holdout_agreement"]
        properties["expectedAccuracyCost"] = residual["expected_accuracy_drop"]
        properties["residualUnlearnt"] = residual["rescan_after_relearning"]
    if report.get("sanitization"):
        properties["sanitizationRefused"] = report["sanitization"]["refused"]
    related = [(output, "the model written by clean")] if output else None
    if not report.get("changed", True):
        name = "no-backdoor-found"
    elif detection is not None and detection["suspected_targets"]:
        name = "backdoor-cleaned"
    else:
        name = "cleaned-without-suspicion"
    found = [result(name, path, f"{path}: {report['verdict']}", properties, related, sha)]
    if report.get("changed", True) and rescan is not None and rescan["suspected_targets"] and output:
        classes = ", ".join(str(c) for c in rescan["suspected_targets"])
        found.append(result("backdoor-suspected", output,
                            f"{output}: a scan of the cleaned model still flags class {classes}",
                            _scan_properties(rescan), [(path, "the model before cleaning")],
                            (report.get("output") or {}).get("sha256")))
    return found


def report_results(report: dict, model: str | Path | None = None) -> list[dict]:
    """The findings of any report: a clean report has ``changed``, a scan report does not."""
    return clean_results(report, model) if "changed" in report else scan_results(report, model)


def error_result(model: str | Path, message: str, exit_code: int) -> dict:
    """A model that produced no report: refused (3), parity failure (4), or not checked."""
    name = {3: "model-refused", 4: "parity-failure"}.get(exit_code, "model-not-checked")
    return result(name, model, message, {"exitCode": exit_code})


def batch_results(outcomes: list[dict], reports: dict[str, dict]) -> list[dict]:
    """The findings of a batch: ``outcomes`` as in ``summary.json`` (model, status, exit_code,
    message), ``reports`` the report (clean or scan) of each model that has one from this run,
    by model path; a model without one is a refusal or failure."""
    found: list[dict] = []
    for outcome in outcomes:
        report = reports.get(outcome["model"])
        if report is not None:
            rows = report_results(report, outcome["model"])
            for row in rows:
                row.setdefault("properties", {})["batchStatus"] = outcome["status"]
            found += rows
        else:
            found.append(error_result(outcome["model"], f"{outcome['model']}: {outcome['message']}",
                                      outcome["exit_code"]))
    return found


def _version() -> str:
    try:
        return metadata.version("otbr-onnx")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def invocation(arguments: list[str], exit_code: int, error: str | None = None) -> dict:
    """How the tool was run: its command line and exit code; ``error``: why it stopped early."""
    out = {"commandLine": shlex.join(["otbr-onnx", *arguments]), "arguments": list(arguments),
           "exitCode": exit_code, "exitCodeDescription": EXIT_MEANINGS.get(exit_code, "error"),
           "executionSuccessful": exit_code not in UNSUCCESSFUL_EXITS}
    try:
        out["workingDirectory"] = {"uri": Path.cwd().as_uri()}
    except OSError:  # the folder was removed while the tool ran: the log matters more
        pass
    if error is not None:
        out["toolExecutionNotifications"] = [{"level": "error", "message": {"text": error}}]
    return out


def log(results: list[dict], arguments: list[str], exit_code: int, error: str | None = None) -> dict:
    """The complete SARIF log: one run of otbr-onnx with its rules, results and invocation."""
    driver = {"name": "otbr-onnx", "version": _version(), "semanticVersion": _version(),
              "rules": [{"id": r.id, "name": r.name, "shortDescription": {"text": r.short},
                         "fullDescription": {"text": r.full}, "help": {"text": r.full},
                         "defaultConfiguration": {"level": r.level}, "properties": {"tags": ["security"]}}
                        for r in RULES]}
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION,
            "runs": [{"tool": {"driver": driver}, "invocations": [invocation(arguments, exit_code, error)],
                      "columnKind": "unicodeCodePoints", "results": results}]}
