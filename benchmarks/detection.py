"""Detection benchmark: the scan's verdict on every model of ``DATA_MODELS`` (every trigger family,
a target other than 0 for each, an image-keyed Blended, eleven clean models of four architectures
and three seeds), data-free and with ``--data N`` of the user's images.

A backdoored model counts as a hit when it is flagged with its true target first; a clean model
as a false alarm when anything is flagged. Run from the repository root (needs Debian's
dataset-fashion-mnist; models are trained once and cached by benchmarks/backdoored.py):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/detection.py --out benchmarks/DETECTION.md
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/detection.py --data 200 --json /tmp/d200.json

With ``--data N`` the user's images are N Fashion-MNIST test images DISJOINT from the 2000 the
benchmark evaluates on (seeded), unlabelled. Each row keeps every family's per-class z, so the
table can be re-derived at other thresholds without rerunning (``--from-json``), and the clean
rows give the calibration: each family's largest z over the clean models (thresholds are set
from those, never from backdoored models) and a leave-one-clean-model-out false-alarm estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from benchmarks.backdoored import (ATTACKS, DATA_MODELS, EVAL_CLEAN, SEED, get_model, load_data,  # noqa: E402
                                   parse_model, target_of)
from benchmarks.datasets import load_fashion_mnist  # noqa: E402
from otbr_onnx import CleanOptions  # noqa: E402
from otbr_onnx.detect import MARGIN_Z_WITH_DATA, detect  # noqa: E402
from otbr_onnx.detectors.inversion import THRESHOLDS  # noqa: E402
from otbr_onnx.prepare import prepare  # noqa: E402


def user_images(count: int, seed: int = 21) -> np.ndarray:
    """``count`` test images the benchmark never evaluates on (load_data's x_eval excluded)."""
    x_test, _ = load_fashion_mnist("test")
    eval_idx = np.random.default_rng(SEED).choice(len(x_test), EVAL_CLEAN, replace=False)
    rest = np.setdiff1d(np.arange(len(x_test)), eval_idx)
    return x_test[np.sort(np.random.default_rng(seed).choice(rest, count, replace=False))]


def scan_row(name: str, data, options: CleanOptions, images: np.ndarray | None = None) -> dict:
    arch, attack = parse_model(name)
    model, _ = get_model(arch, attack, data, lambda message: print(message, file=sys.stderr))
    began = time.perf_counter()
    result = detect(prepare(model, options), options, images=images)
    seconds = time.perf_counter() - began
    target = target_of(attack)
    family = "clean" if ATTACKS[attack] is None else ATTACKS[attack].trigger
    # the data-free threshold (with images ``result.threshold`` is the raised MARGIN_Z_WITH_DATA)
    row = {"model": name, "family": family, "target": target, "margin_z": [float(v) for v in result.z],
           "margin_threshold": options.scan.threshold, "seconds": seconds}
    if result.inversion is not None:
        inv = result.inversion
        row["inversion"] = {f: [float(v) for v in inv.z[f]] for f in inv.families}
        row["flipped"] = {f: [float(v) for v in inv.flipped[f]] for f in inv.families}
        row["inversion_seconds"] = inv.seconds
    return row


def flagged(z: list[float], threshold: float) -> list[int]:
    """Classes above ``threshold``, largest z first."""
    values = np.asarray(z)
    return [int(c) for c in np.argsort(-values, kind="stable") if values[c] > threshold]


def verdicts(row: dict, thresholds: dict[str, float]) -> dict[str, list[int]]:
    """Per test ("margin", each family, "inversion": any family, "combined": either), the classes
    flagged, strongest (z over threshold) first."""
    found = {"margin": flagged(row["margin_z"], row["margin_threshold"])}
    if "inversion" in row:  # with data the margin test counts above its calibrated threshold only
        margin_threshold = max(row["margin_threshold"], MARGIN_Z_WITH_DATA)
        strength = np.asarray(row["margin_z"]) / margin_threshold
        anomaly = np.max([np.asarray(row["inversion"][f]) / thresholds[f] for f in row["inversion"]], axis=0)
        for f, z in row["inversion"].items():
            found[f] = flagged(z, thresholds[f])
        found["inversion"] = flagged(list(anomaly), 1.0)
        strength = np.maximum(strength, anomaly)
        union = set(flagged(row["margin_z"], margin_threshold)) | set(found["inversion"])
        found["combined"] = sorted(union, key=lambda c: (-strength[c], c))
    return found


def hit(row: dict, found: list[int]) -> bool:
    """Backdoored: the true target flagged first; clean: nothing flagged."""
    return found[:1] == [row["target"]] if row["target"] is not None else not found


def table(rows: list[dict], thresholds: dict[str, float]) -> str:
    tests = list(verdicts(rows[0], thresholds))
    lines = ["| model | family | target | " + " | ".join(tests) + " | s |", "|---" * (len(tests) + 4) + "|"]
    for r in rows:
        found = verdicts(r, thresholds)
        cells = []
        for t in tests:
            mark = ("" if hit(r, found[t]) else (" miss" if r["target"] is not None else " FA"))
            cells.append(f"{found[t]}{mark}")
        lines.append(f"| {r['model']} | {r['family']} | {'' if r['target'] is None else r['target']} | "
                     + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    backdoored = [r for r in rows if r["target"] is not None]
    clean = [r for r in rows if r["target"] is None]
    families = sorted({r["family"] for r in backdoored})
    lines += ["", "| trigger family (attack) | " + " | ".join(tests) + " |", "|---" * (len(tests) + 1) + "|"]
    for f in families:
        group = [r for r in backdoored if r["family"] == f]
        lines.append(f"| {f} | " + " | ".join(f"{sum(hit(r, verdicts(r, thresholds)[t]) for r in group)}/{len(group)}"
                                               for t in tests) + " |")
    lines.append("| **all backdoored: hits** | " + " | ".join(
        f"**{sum(hit(r, verdicts(r, thresholds)[t]) for r in backdoored)}/{len(backdoored)}**" for t in tests) + " |")
    lines.append("| **clean: false alarms** | " + " | ".join(
        f"**{sum(not hit(r, verdicts(r, thresholds)[t]) for r in clean)}/{len(clean)}**" for t in tests) + " |")
    seconds = np.mean([r["seconds"] for r in rows])
    extra = (f"; of which inversion {np.mean([r['inversion_seconds'] for r in rows]):.1f} s"
             if "inversion_seconds" in rows[0] else "")
    lines += ["", f"Mean seconds per model (margin scan + inversion): {seconds:.1f}{extra}."]
    return "\n".join(lines) + "\n"


def calibration(runs: dict[int, list[dict]]) -> str:
    """Each family's largest z over the clean models of every run (what ``THRESHOLDS`` are set
    from: largest + 1), and a leave-one-clean-model-out estimate of that rule's false-alarm rate:
    each clean model judged at thresholds set from the OTHER clean models only (all runs)."""
    clean = [(n, r) for n, rows in runs.items() for r in rows if r["target"] is None and "inversion" in r]
    if not clean:
        return ""
    families = list(clean[0][1]["inversion"])
    lines = ["| family | largest z per clean model (" + ", then ".join(f"{n} images" for n in runs)
             + ") | max | threshold in use |", "|---|---|---|---|"]
    for f in families:
        values = [max(r["inversion"][f]) for _, r in clean]
        lines.append(f"| {f} | {', '.join(f'{v:.1f}' for v in values)} | {max(values):.2f} | {THRESHOLDS[f]:g} |")
    alarms = []
    for n, r in clean:
        held = {f: max(max(o["inversion"][f]) for _, o in clean if o["model"] != r["model"]) + 1.0
                for f in families}
        if verdicts(r, held)["inversion"]:
            alarms.append(f"{r['model']} ({n} images)")
    lines += ["", f"Leave-one-clean-model-out (thresholds = largest z of the OTHER clean models + 1, per family): "
              f"{len(alarms)} of {len(clean)} clean model runs flagged by the inversion"
              + (f": {', '.join(alarms)}" if alarms else "") + "."]
    return "\n".join(lines) + "\n"


def summary(runs: dict[int, list[dict]], thresholds: dict[str, float]) -> str:
    """Per trigger family (attack): hits of each test, data-free and with each image count; false
    alarms on the clean models; mean seconds."""
    first = next(iter(runs.values()))
    families = sorted({r["family"] for r in first if r["target"] is not None})
    columns = [("data-free", None, "margin")] + [(f"{n} img: {t}", n, t) for n in runs
                                                  for t in ("patch", "additive", "warp", "inversion", "combined")]

    def rows_of(n):
        return first if n is None else runs[n]

    def count(n, test, keep) -> str:
        group = [r for r in rows_of(n) if keep(r)]
        return f"{sum(hit(r, verdicts(r, thresholds)[test]) for r in group)}/{len(group)}"

    lines = ["| attack | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(count(n, t, lambda r, f=f: r["family"] == f) for _, n, t in columns)
                     + " |")
    lines.append("| **backdoored: true target first** | " + " | ".join(
        f"**{count(n, t, lambda r: r['target'] is not None)}**" for _, n, t in columns) + " |")
    lines.append("| **clean: flagged (false alarms)** | " + " | ".join(
        "**{}/{}**".format(*[(sum(not hit(r, verdicts(r, thresholds)[t]) for r in g), len(g))
                             for g in [[r for r in rows_of(n) if r["target"] is None]]][0]) for _, n, t in columns)
        + " |")
    seconds = [f"{np.mean([r['seconds'] - r.get('inversion_seconds', 0) for r in first]):.0f}"]
    for n in runs:
        inv = np.mean([r["inversion_seconds"] for r in runs[n]])
        seconds += [""] * 3 + [f"{inv:.0f}", f"{np.mean([r['seconds'] for r in runs[n]]):.0f}"]
    lines.append("| mean seconds per model | " + " | ".join(seconds) + " |")
    return "\n".join(lines) + "\n"


def document(runs: dict[int, list[dict]]) -> str:
    """benchmarks/DETECTION.md from the runs' rows (image count -> rows)."""
    first = next(iter(runs.values()))
    clean = sum(r["target"] is None for r in first)
    parts = [
        "# Detection: data-free and with the user's images (`otbr-onnx scan [--data]`)\n",
        f"Written by `benchmarks/detection.py` on 2 shared CPU cores (1 thread per process, nice 10, other jobs "
        f"running: seconds are upper bounds). {len(first) - clean} backdoored models (every family, targets other "
        f"than 0, an image-keyed Blended) and {clean} clean models (PreAct, VGG, MobileNetV2 from 3 seeds, "
        f"PreAct-x2 from 2). The user's images are Fashion-MNIST test images disjoint from the 2000 evaluation "
        f"images, unlabelled. A backdoored model is a hit when flagged with its true target FIRST; a clean model "
        f"is a false alarm when anything is flagged. `data-free` is the maximum-margin scan (threshold 3.5, not "
        f"recalibrated); `patch`/`additive`/`warp` each inversion family alone at its threshold; `inversion` any "
        f"family; `combined` what `scan --data` reports (margin or inversion).\n",
        "## Summary\n", summary(runs, THRESHOLDS),
        "\nSettings (`InversionConfig` defaults): at most 200 images (seeded subsample), per family 60 Adam steps "
        "(lr 0.2) of 16 images per class, all 10 classes in one batch; budgets: patch mask <= 1.5% of the pixels, "
        "additive |d| <= 0.1, warp <= 0.5 pixel on a 4x4 grid. Statistic: mean target margin on the other "
        "classes' images, leave-one-out robust z across classes. With data the margin test counts above z "
        f"{MARGIN_Z_WITH_DATA:g} only (its clean-calibrated threshold: the data-free 3.5 flags 3 of 11 clean "
        "models, whose margin z reach 17.8, 11.3 and 7.7); so `combined` loses the MobileNetV2 BadNets model "
        "(margin z 13.1) that the data-free scan finds. The budgets were chosen by hand on a few of these models "
        "(additive 0.06 first: 12/21 and 11/21 hits, 0/11 false alarms; 0.1 adopted after a look at 5 backdoored "
        "and 3 clean models: the hits below are optimistic for unseen models; the thresholds never saw a "
        "backdoored model). Misses: noise-keyed Blended on PreAct target 0, SIG on VGG/MobileNetV2 and the "
        "target-7 SIG model (whose own trigger flips only 34% of test images), BadNets through the inversion "
        "(the patch search does not localise a 3x3 patch in 60 steps; 150 steps did on PreAct, z 4.9). Cost: a "
        "full-width PreAct-ResNet18 at 32x32 was NOT brought within 2 minutes on 2 CPU cores: the inversion runs "
        "3 x 60 forward+backward passes of 160 images plus 3 scoring passes of about 1800 images: measured 573 s "
        "for `scan --data` of a randomly initialised one with 200 random images (126 s data-free), on 2 cores "
        "shared with three benchmark processes.\n",
        "\n## Calibration (clean models only)\n",
        "Thresholds per family (`otbr_onnx/detectors/inversion.py`, `THRESHOLDS`): the largest robust z any class of "
        "any clean model reached in that family over both image counts, plus 1; set for NO false alarm on the 11 "
        "clean calibration models (in-sample 0/11 by construction). The leave-one-model-out line below is the "
        "honest estimate of the rate on unseen clean models; backdoored models were never used.\n",
        calibration(runs),
    ]
    for n, rows in runs.items():
        parts += [f"\n## Per model, {n} images\n", table(rows, THRESHOLDS)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the markdown here (default: stdout only)")
    parser.add_argument("--json", type=Path, help="write the rows (every z) here")
    parser.add_argument("--from-json", nargs="+", metavar="N=ROWS.json",
                        help="rows of earlier runs with N images each: only rebuild the document")
    parser.add_argument("--data", type=int, default=0, metavar="N", help="N user images (0: data-free)")
    parser.add_argument("--models", nargs="+", default=list(DATA_MODELS))
    args = parser.parse_args()
    if args.from_json:
        runs = {int(n): json.loads(Path(p).read_text()) for n, p in (a.split("=", 1) for a in args.from_json)}
        text = document(runs)
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    else:
        data, options = load_data(), CleanOptions()
        images = user_images(args.data) if args.data else None
        rows = []
        for name in args.models:
            rows.append(scan_row(name, data, options, images))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("inversion", "flipped")}),
                  file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows))
    with_data = "inversion" in rows[0]
    title = (f"# Detection with {args.data or '?'} user images (`otbr-onnx scan --data`)\n\n" if with_data else
             "# Detection, data-free (`otbr-onnx scan` defaults)\n\n")
    text = (title + "Written by `benchmarks/detection.py` on 2 CPU cores (1 thread per process).\n\n"
            + table(rows, THRESHOLDS) + ("\n" + calibration({args.data: rows}) if with_data else ""))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
