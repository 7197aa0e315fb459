"""Detection benchmark on the split (benchmarks/split.py): the current ``scan --data`` detection
against the minimal-trigger detector (``otbr_onnx.detectors.minimal``), model by model.

For every model of the split, on N=200 of the user's images (benchmarks/with_data.py's
``user_data``: unlabeled Fashion-MNIST test images outside the evaluation images):

- ``current``: ``detect.detect`` with the images, as ``scan --data`` ships (margin scan, trigger
  inversion, ``detect.combine``);
- ``minimal``: ``MinimalDetector`` with ``MinimalConfig()`` (or ``minimal:<json overrides>``,
  e.g. ``'minimal:{"steps": 100}'``, recorded under that name).

Each row keeps every class's statistic (the minimal detector's norms per family, and the best norm
reached at each checkpoint step, so step counts and thresholds can be re-derived without rerunning:
``--threshold``, ``--at-step``), the classes flagged and the seconds. A backdoored model counts as
a hit when its true target is flagged FIRST; a clean model as a false alarm when anything is
flagged. Models whose attack did not take (ASR < 50 %) are listed but left out of the counts.

    OMP_NUM_THREADS=1 python benchmarks/detection_split.py --split development --methods current,minimal \\
        --resume /tmp/detsplit.jsonl --out /tmp/dev.md
    python benchmarks/detection_split.py --render-only --resume /tmp/detsplit.jsonl --out benchmarks/DETECTION_SPLIT.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from otbr_onnx import CleanOptions  # noqa: E402
from otbr_onnx.detect import DEFAULT_THRESHOLD, detect  # noqa: E402
from otbr_onnx.prepare import prepare  # noqa: E402
from benchmarks.backdoored import load_data  # noqa: E402
from benchmarks.defense import _fmt, _mean, _versions  # noqa: E402
from benchmarks.split import SPLITS, get_model  # noqa: E402
from benchmarks import with_data  # noqa: E402
from benchmarks.with_data import short, user_data  # noqa: E402

ATTACK_MIN_ASR = 50.0  # as benchmarks/removal.py: below it the attack did not take
N_IMAGES = 200
FAMILIES = ("badnets", "blended", "sig", "wanet", "low_frequency")


def run_current(prepared, images: np.ndarray) -> dict:
    began = time.perf_counter()
    result = detect(prepared, CleanOptions(), images=images)
    seconds = time.perf_counter() - began
    inversion = result.inversion
    row = {"flagged": [int(c) for c in result.suspected], "seconds": round(seconds, 2),
           "margin_z": [round(float(v), 4) for v in result.z], "margin_flagged": result.margin_suspected}
    if inversion is not None:
        row["inversion"] = {"z": {f: [round(float(v), 4) for v in z] for f, z in inversion.z.items()},
                            "flagged": [int(c) for c in inversion.suspected],
                            "seconds": round(float(inversion.seconds), 2)}
    return row


def minimal_config(method: str):
    from otbr_onnx.detectors import minimal
    overrides = json.loads(method.split(":", 1)[1]) if ":" in method else {}
    return replace(minimal.MinimalConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def run_minimal(prepared, images: np.ndarray, method: str) -> dict:
    from otbr_onnx.detectors import minimal
    config = minimal_config(method)
    began = time.perf_counter()
    found = minimal.search(prepared.module, images, prepared.num_classes, prepared.loaded.output_index,
                           prepared.loaded.output_is_probability, config)
    seconds = time.perf_counter() - began
    return {"flagged": [int(c) for c in found.suspected], "seconds": round(seconds, 2),
            "config": asdict(config), "minimal": found.as_dict(pictures=False)}


def backdoored(row: dict) -> bool:
    return row.get("asr") is not None and row["asr"] >= ATTACK_MIN_ASR


def failed_attack(row: dict) -> bool:
    return row.get("asr") is not None and not backdoored(row)


def row_key(row: dict) -> tuple[str, str, str]:
    return row["split"], row["model"], row["method"]


def read_rows(path: Path | None) -> list[dict]:
    """The finished rows of a --resume file, keyed by split, model and method."""
    return with_data.read_rows(path, row_key)


def reflag(row: dict, threshold: float | None, at_step: int | None, log: bool | None = None) -> list[int]:
    """A minimal row's flagged classes at another threshold or checkpoint step (the same run)."""
    if threshold is None and at_step is None and log is None:
        return row["flagged"]
    result = row["minimal"]
    norms = {}
    for family, values in result["norms"].items():
        if at_step is not None:
            history = result["history"][family]
            steps = [h["step"] for h in history if h["step"] <= at_step]
            values = next(h["norms"] for h in history if h["step"] == max(steps))
        norms[family] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    from otbr_onnx.detectors import minimal
    limit = threshold if threshold is not None else result.get("thresholds", result.get("threshold"))
    return minimal.verdict(norms, limit, result.get("searched"), result.get("min_spread", 0.05),
                           result.get("log_norms", False) if log is None else log)[0]


def data_free(row: dict) -> list[int]:
    """What `scan` WITHOUT --data flags on a ``current`` row: its margin test alone at the
    data-free threshold (the same maximum-margin search; with --data only the threshold is raised)."""
    z = np.asarray(row["margin_z"])
    return [int(c) for c in np.argsort(-z, kind="stable") if z[c] > DEFAULT_THRESHOLD]


def summarise(rows: list[dict], flagged_of) -> dict:
    bd = [r for r in rows if backdoored(r)]
    cl = [r for r in rows if r.get("asr") is None]
    hits = [r for r in bd if flagged_of(r)[:1] == [r["target"]]]
    return {"backdoored": len(bd), "hits": len(hits),
            "per_family": {f: (sum(r in hits for r in bd if r["family"] == f), sum(r["family"] == f for r in bd))
                           for f in FAMILIES},
            "clean": len(cl), "false_alarms": sum(bool(flagged_of(r)) for r in cl),
            "false_alarm_models": [r["model"] for r in cl if flagged_of(r)],
            "mean_seconds": _mean([r["seconds"] for r in rows])}


def render(rows: list[dict], command: str, threshold: float | None, at_step: int | None) -> str:
    out = [f"# Detection on the split: current `scan --data` vs the minimal-trigger detector", "",
           f"- Command: `{command}`",
           f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}; versions: {_versions()}",
           "- 2 CPU cores shared with other jobs' benchmarks, one torch thread: seconds are slow and noisy.",
           f"- User images: {N_IMAGES} unlabeled Fashion-MNIST test images outside the evaluation images.",
           "- hit: the true target flagged FIRST; false alarm: a clean model with anything flagged.",
           f"- Left out of the counts (attack did not take, ASR < {ATTACK_MIN_ASR:g} %): "
           + (", ".join(sorted({f"{r['model']} ({_fmt(r['asr'])} %)" for r in rows if failed_attack(r)})) or "none")
           + "."]
    if threshold is not None or at_step is not None:
        out.append(f"- Minimal rows re-derived at threshold {threshold} / checkpoint step {at_step} from the same runs.")
    for split in [s for s in SPLITS if any(r["split"] == s for r in rows)]:
        part = [r for r in rows if r["split"] == split]
        methods = list(dict.fromkeys(r["method"] for r in part))
        label = ("development: settings chosen on it" if split == "development"
                 else "held-out: run once with the development settings, never tuned on")
        out += ["", f"## {split} split ({label})", "", "### Summary", "",
                "| method | backdoored hit (target first) | " + " | ".join(FAMILIES)
                + " | clean flagged | mean s |", "| --- |" + " --- |" * (len(FAMILIES) + 3)]
        summaries = [(m, [r for r in part if r["method"] == m],
                      (lambda r: reflag(r, threshold, at_step)) if m.startswith("minimal") else (lambda r: r["flagged"]))
                     for m in methods]
        if "current" in methods:  # the same runs' margin test at the data-free threshold: `scan` without --data
            summaries.append((f"data-free `scan` (margin z > {DEFAULT_THRESHOLD:g}, from the current rows)",
                              [r for r in part if r["method"] == "current"], data_free))
        for method, group, flag in summaries:
            s = summarise(group, flag)
            fams = " | ".join(f"{h}/{n}" if n else "-" for h, n in s["per_family"].values())
            out.append(f"| {method} | {s['hits']}/{s['backdoored']} | {fams} | {s['false_alarms']}/{s['clean']}"
                       + (f" ({', '.join(s['false_alarm_models'])})" if s["false_alarm_models"] else "")
                       + f" | {_fmt(s['mean_seconds'])} |")
        out += ["", "### Per model", "", "| model | family | target | ASR | " +
                " | ".join(f"{m} flagged | {m} s" for m in methods) + " |",
                "| --- | --- | --- | --- |" + " --- | --- |" * len(methods)]
        for spec in SPLITS[split]:
            mine = {r["method"]: r for r in part if r["model"] == spec.name}
            if not mine:
                continue
            first = next(iter(mine.values()))
            cells = []
            for method in methods:
                r = mine.get(method)
                if r is None:
                    cells.append("- | -")
                    continue
                flag = reflag(r, threshold, at_step) if method.startswith("minimal") else r["flagged"]
                cells.append(f"{flag or '-'} | {_fmt(r['seconds'])}")
            out.append(f"| {spec.name} | {spec.family or 'clean'} | {spec.target if spec.backdoored else '-'} | "
                       f"{_fmt(first.get('asr'))} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), default="development")
    parser.add_argument("--models", default=None, help="names, comma-separated (default: the whole split)")
    parser.add_argument("--methods", default="current,minimal", help="current, minimal, 'minimal:{json}'")
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--threshold", type=float, default=None, help="re-derive minimal rows at this index")
    parser.add_argument("--at-step", type=int, default=None, help="re-derive minimal rows at this checkpoint")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to the rendered table")
    args = parser.parse_args(argv)
    command = "python benchmarks/detection_split.py " + " ".join(sys.argv[1:] if argv is None else argv)
    methods = [m for m in args.methods.split(";" if "{" in args.methods else ",") if m]
    rows = read_rows(args.resume)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f}s] {message}", file=sys.stderr, flush=True)

    if not args.render_only:
        torch.set_num_threads(1)
        data = load_data()
        done = {row_key(r) for r in rows}
        specs = [s for s in SPLITS[args.split] if args.models is None or s.name in args.models.split(",")]
        with tempfile.TemporaryDirectory(prefix="detsplit_") as folder:
            images = user_data(data, (N_IMAGES,), Path(folder)).images[N_IMAGES]
            for spec in specs:
                todo = [m for m in methods if (args.split, spec.name, m) not in done]
                if not todo:
                    continue
                proto, info = get_model(spec, data, log)
                prepared = prepare(proto, CleanOptions())
                for method in todo:
                    row = {"split": args.split, "model": spec.name, "family": spec.family or "clean",
                           "target": spec.target if spec.backdoored else None, "asr": info.get("asr"),
                           "method": method}
                    try:
                        row.update(run_current(prepared, images) if method == "current"
                                   else run_minimal(prepared, images, method))
                    except Exception as error:  # noqa: BLE001 - one failure must not end a long run
                        row["error"] = f"{type(error).__name__}: {short(str(error), 200)}"
                    log(f"{spec.name} {method}: flagged {row.get('flagged')} in {row.get('seconds')} s "
                        f"(target {row['target']}) {row.get('error') or ''}")
                    rows.append(row)
                    if args.resume is not None:
                        with args.resume.open("a") as handle:
                            handle.write(json.dumps(row) + "\n")
    text = render(sorted(rows, key=lambda r: (r["split"], r["model"])), command, args.threshold, args.at_step)
    if args.notes is not None:
        text += "\n" + args.notes.read_text()
    if args.out is not None:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
