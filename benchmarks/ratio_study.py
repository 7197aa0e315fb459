"""How the data-free ratio rule's two choices move the defense: NWC scale across layers x budget.

Runs `clean` with the rule (no --prune-ratio) on every model of benchmarks/defense.py, for each
combination of `nwc_scale` (sum: the paper's ranking; mean: per weight) and `max_disagreement`
(% of synthesised probes whose answer may change), and writes one row per combination: the
same means as RESULTS.md, plus how many models the rule refused (scored as unchanged: ACC and
ASR as before, DER 50). Uses the models cached by defense.py (trains them if missing) and needs
Debian's dataset-fashion-mnist. About 5 minutes on 2 CPU cores with a warm cache:

    nice -n 10 .venv/bin/python benchmarks/ratio_study.py --out benchmarks/RATIO_STUDY.md
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defense  # noqa: E402  (adds the repository root to sys.path)

from otbr_onnx import CleanOptions  # noqa: E402

SCALES = ("sum", "mean")
BUDGETS = (5.0, 10.0, 20.0)


def study(pairs: list[tuple[str, str]]) -> list[dict]:
    data = defense.load_data(defense.DEFAULT_TRAIN)
    results = {(scale, budget): [] for scale in SCALES for budget in BUDGETS}
    with defense.UnlearningMemo() as memo:
        for arch, attack in pairs:
            model, _ = defense.get_model(arch, attack, data, lambda m: print(m, file=sys.stderr))
            sets, before = defense.measure_before(model, data, attack)
            for (scale, budget), outcomes in results.items():
                options = replace(CleanOptions(), nwc_scale=scale, max_disagreement=budget)
                outcomes.append((before, defense.run_clean(model, options, sets, before, memo)))
            print(f"{arch} {attack} done", file=sys.stderr, flush=True)
    rows = []
    for (scale, budget), outcomes in results.items():
        rows.append({
            "scale": scale, "budget": budget,
            **defense.outcome_stats([(b.as_dict(), asdict(o)) for b, o in outcomes]),
            "refused": sum(o.refused is not None for _, o in outcomes),
            "models": len(outcomes),
        })
    return rows


def render(rows: list[dict], command: str, seconds: float) -> str:
    out = ["# Ratio rule study: NWC scale x disagreement budget", "", f"- Command: `{command}` ({seconds:.0f} s)",
           "- Each row: otbr with the data-free ratio rule, default options but these two. Refusals are scored "
           "as the unchanged model (DER 50 on backdoored models, no ACC drop).", "",
           "| nwc_scale | max_disagreement | mean ASR | mean ACC drop | worst ACC drop | mean DER "
           "| clean: mean ACC drop | clean: worst ACC drop | refused |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['scale']} | {r['budget']:g} | {defense._fmt(r['mean_asr'])} | "
                   f"{defense._fmt(r['mean_acc_drop'])} | {defense._fmt(r['worst_acc_drop'])} | "
                   f"{defense._fmt(r['mean_der'])} | "
                   f"{defense._fmt(r['clean_mean_acc_drop'])} | {defense._fmt(r['clean_worst_acc_drop'])} | "
                   f"{r['refused']} of {r['models']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=defense.ROOT / "benchmarks" / "RATIO_STUDY.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()
    pairs = [(arch, attack) for attack in defense.ATTACKS for arch in defense.ARCHS]
    rows = study(pairs)
    text = render(rows, "python " + " ".join(sys.argv), time.perf_counter() - began)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
