"""Detection benchmark: the scan's verdict on every model of ``DATA_MODELS`` (every trigger family,
a target other than 0 for each, an image-keyed Blended, seven clean models of four architectures
and three seeds), data-free.

A backdoored model counts as a hit when it is flagged with its true target first; a clean model
as a false alarm when anything is flagged. Run from the repository root (needs Debian's
dataset-fashion-mnist; models are trained once and cached by benchmarks/backdoored.py):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/detection.py --out benchmarks/DETECTION.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from benchmarks.backdoored import ATTACKS, DATA_MODELS, get_model, load_data, parse_model, target_of  # noqa: E402
from otbr_onnx import CleanOptions  # noqa: E402
from otbr_onnx.detect import detect  # noqa: E402
from otbr_onnx.prepare import prepare  # noqa: E402


def scan_row(name: str, data, options: CleanOptions) -> dict:
    arch, attack = parse_model(name)
    model, _ = get_model(arch, attack, data, lambda message: print(message, file=sys.stderr))
    began = time.perf_counter()
    result = detect(prepare(model, options), options)
    target = target_of(attack)
    family = "clean" if ATTACKS[attack] is None else ATTACKS[attack].trigger
    return {"model": name, "family": family, "target": target, "suspected": result.suspected,
            "top_z": float(result.z.max()), "target_z": None if target is None else float(result.z[target]),
            "hit": (result.suspected[:1] == [target]) if target is not None else not result.suspected,
            "seconds": time.perf_counter() - began}


def table(rows: list[dict]) -> str:
    lines = ["| model | family | target | flagged | largest z | target's z | verdict | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = ("hit" if r["hit"] else "missed") if r["target"] is not None else (
            "ok" if r["hit"] else "FALSE ALARM")
        target_z = "" if r["target_z"] is None else f"{r['target_z']:.2f}"
        lines.append(f"| {r['model']} | {r['family']} | {'' if r['target'] is None else r['target']} | "
                     f"{r['suspected']} | {r['top_z']:.2f} | {target_z} | {verdict} | {r['seconds']:.1f} |")
    backdoored = [r for r in rows if r["target"] is not None]
    clean = [r for r in rows if r["target"] is None]
    families = sorted({r["family"] for r in backdoored})
    lines += ["", "| family | hits (true target flagged first) |", "|---|---|"]
    lines += [f"| {f} | {sum(r['hit'] for r in backdoored if r['family'] == f)}/"
              f"{sum(r['family'] == f for r in backdoored)} |" for f in families]
    lines += ["", f"Backdoored models flagged with their true target first: {sum(r['hit'] for r in backdoored)}/"
              f"{len(backdoored)}; clean models flagged (false alarms): {sum(not r['hit'] for r in clean)}/{len(clean)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the markdown table here (default: stdout only)")
    parser.add_argument("--models", nargs="+", default=list(DATA_MODELS))
    args = parser.parse_args()
    data, options = load_data(), CleanOptions()
    rows = []
    for name in args.models:
        rows.append(scan_row(name, data, options))
        print(rows[-1], file=sys.stderr, flush=True)
    text = ("# Detection, data-free (`otbr-onnx scan` defaults)\n\n"
            "Written by `benchmarks/detection.py` on 2 CPU cores (1 thread per process).\n\n" + table(rows))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
