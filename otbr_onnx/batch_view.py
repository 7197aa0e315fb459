"""Batch mode for people: one line per model as it finishes, and a table of all of them at the end.

Plain text (the same on a terminal, in a log or a pipe); every string that comes from a file
name or a model's message is escaped by the caller's ``printable``.
"""

from __future__ import annotations

from pathlib import Path

from otbr_onnx.outcome import Outcome

CLEAN_COLUMNS = ("model", "status", "verdict", "target", "strength", "fidelity", "time")
SCAN_COLUMNS = ("model", "status", "verdict", "target", "time")
NONE = "-"


def outcome_line(outcome: Outcome) -> str:
    """``status  model  facts`` (done) or ``status  model: why`` (refused, failed)."""
    head = f"{outcome.status:9} {outcome.model}"
    if outcome.verdict is None:  # no report: refused or failed
        return head + (f": {outcome.message}" if outcome.message else "")
    facts = [_verdict(outcome)]
    if outcome.strength is not None:
        facts.append(f"strength {outcome.strength:g}")
    if outcome.fidelity is not None:
        facts.append(f"fidelity {_fidelity(outcome)}")
    facts.append(f"{outcome.seconds:.1f}s")
    return f"{head}  " + ", ".join(facts)


def outcome_table(outcomes: list[Outcome], columns: tuple[str, ...] = CLEAN_COLUMNS) -> list[str]:
    """The final table: a header, one row per model, columns aligned, ``-`` where a fact does not
    apply."""
    rows = [columns] + [tuple(cell(o) for cell in (_CELLS[c] for c in columns)) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


_CELLS = {
    "model": lambda o: Path(o.model).name,  # unique within a batch (collect_models refuses duplicates)
    "status": lambda o: o.status,
    "verdict": lambda o: o.verdict or NONE,
    "target": lambda o: ",".join(str(t) for t in o.targets) or NONE,
    "strength": lambda o: NONE if o.strength is None else f"{o.strength:g}",
    "fidelity": lambda o: _fidelity(o),
    "time": lambda o: f"{o.seconds:.1f}s",
}


def _verdict(outcome: Outcome) -> str:
    if outcome.targets:
        return f"suspected class {','.join(str(t) for t in outcome.targets)}"
    return outcome.verdict or NONE


def _fidelity(outcome: Outcome) -> str:
    """Soft agreement on synthesised probes (no data) as a bare percentage; accuracy on the
    user's calibration images marked as such."""
    if outcome.fidelity is None:
        return NONE
    mark = " acc" if outcome.fidelity_metric == "accuracy" else ""
    return f"{outcome.fidelity:.1f}%{mark}"
