"""Removal benchmark on the split (benchmarks/split.py): every remover variant side by side, on the
development split (where settings are chosen) or the held-out split (reported only).

For every model of the split, every data size N and every method of ``--methods``:

- the user's images: N unlabeled Fashion-MNIST test images outside the 2000 evaluation images
  (benchmarks/with_data.py's ``user_data``: seeded, nested);
- ``relearning*`` variants call ``removers.relearning.relearn`` directly with one ``RelearnConfig``
  (the table ``METHODS``); ``pipeline`` runs ``clean --data`` as shipped (scan, remover, checks,
  final scan), ``adversarial`` the adversarial remover through the same pipeline, ``finetune``
  plain fine-tuning of the original on the N images labelled by the original;
- columns: ACC, ASR, DER; ASR after (a) BatchNorm statistics re-estimated on 500 other clean
  images and (b) 100 steps of clean fine-tuning (SGD lr 1e-3, momentum 0.9, batch 50); seconds; the
  refusal, if any (scored as the model the user keeps).

    OMP_NUM_THREADS=1 python benchmarks/removal.py --split development --methods relearning,relearning-reinit \\
        --resume /tmp/removal_dev.jsonl --out benchmarks/REMOVAL_DEV.md
    python benchmarks/removal.py --split held-out --render-only --resume /tmp/removal_ho.jsonl --out benchmarks/REMOVAL.md

Needs Debian's dataset-fashion-mnist; trains (and caches) the split's models when missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from otbr_onnx import CleanOptions, DataOptions, OtbrError, RemovalOptions  # noqa: E402
from otbr_onnx.bridge import convert  # noqa: E402
from otbr_onnx.evaluate import der, evaluate  # noqa: E402
from otbr_onnx.options import MAX_ACC_DROP  # noqa: E402
from otbr_onnx.pipeline import clean_prepared  # noqa: E402
from otbr_onnx.prepare import prepare  # noqa: E402
from otbr_onnx.removers.relearning import RelearnConfig, relearn  # noqa: E402
from otbr_onnx.removers.residual import unlearn_residual  # noqa: E402
from otbr_onnx.robustness import finetune  # noqa: E402
from benchmarks.backdoored import load_data, predict_torch  # noqa: E402
from benchmarks.defense import _fmt, _mean, _versions  # noqa: E402
from benchmarks.split import SPLITS, get_model, poisoned_eval  # noqa: E402
from benchmarks.with_data import (  # noqa: E402
    FINETUNE_BATCH, FINETUNE_LR, FINETUNE_STEPS, MOMENTUM, ROBUST_IMAGES, read_rows, robustness, short, torch_metrics,
    user_data,
)

# A poisoned model whose attack did not take (the trigger reaches fewer test images than this) is
# no backdoored model: listed, left out of the means (a black patch on Fashion-MNIST's black
# background is invisible on most images).
ATTACK_MIN_ASR = 50.0
MAX_DROP = 100.0  # the direct variants are measured whatever they cost; the pipeline applies --max-acc-drop
FAMILIES = ("badnets", "blended", "sig", "wanet", "low_frequency")


@dataclass(frozen=True)
class Method:
    note: str
    config: RelearnConfig | None = None  # a relearning variant, called directly
    options: Callable[[str], CleanOptions] | None = None  # through the pipeline, with the npz path
    residual: str | None = None  # a relearning variant, then: "scan" or "minimal" searches the relearnt model,
    # and what it flags is unlearnt (removers/residual.py)


# The first prototype's settings, which the variants below change one at a time (issue 33's
# prototype: random labels, then 800 Adam steps at 1e-3 with early stopping); ``relearning`` is
# ``RelearnConfig()`` as shipped, chosen from these rows on the development split.
LABELS = RelearnConfig(forget="labels", steps=800, lr=1e-3, patience=4)
FULL = replace(LABELS, steps=1000, patience=1000)  # no early stopping
RICH = dict(rotate=10.0, scale=0.1, jitter=0.2, erase=0.5)
METHODS: dict[str, Method] = {
    "relearning": Method("`clean --data`'s remover as shipped (RelearnConfig(): redraw every weight layer, 2000 "
                         "Adam steps at 2e-3, temperature 1, shifts and flips, filtered teacher)", RelearnConfig()),
    "relearning-labels": Method("forget with random labels (SGD lr 0.01 until < 20 % agreement), 800 steps at 1e-3, "
                                "early stopping (patience 4 x 50 steps), shifts and flips, filtered teacher", LABELS),
    "relearning-features": Method("relearning-labels + penultimate-feature distillation (weight 1)",
                                  replace(LABELS, features=1.0)),
    "relearning-mixup": Method("relearning-labels + filtered mixup", replace(LABELS, mixup=True)),
    "relearning-forget50": Method("relearning-labels, forgetting only until 50 % agreement",
                                  replace(LABELS, forget_agreement=50.0)),
    "relearning-full": Method("relearning-labels, 1000 steps, no early stopping", FULL),
    "relearning-full-nofilter": Method("relearning-full without the filter", replace(FULL, filter="none")),
    "relearning-full-noaug": Method("relearning-full without shifts and flips", replace(FULL, shift=0, flip=False)),
    "relearning-full-mixup": Method("relearning-full + filtered mixup", replace(FULL, mixup=True)),
    "relearning-rich": Method("relearning-full + rotations 10 deg, scale 0.1, jitter 0.2, erase 0.5",
                              replace(FULL, **RICH)),
    "relearning-rich-mixup": Method("relearning-rich + filtered mixup", replace(FULL, mixup=True, **RICH)),
    "relearning-affine": Method("relearning-full + rotations 10 deg, scale 0.1", replace(FULL, rotate=10.0, scale=0.1)),
    "relearning-reinit": Method("relearning-labels, but forget by redrawing every weight layer",
                                replace(LABELS, forget="reinit")),
    "relearning-reinit-half": Method("relearning-labels, but forget by redrawing the deeper half of the weight layers",
                                     replace(LABELS, forget="reinit", depth=0.5)),
    "relearning-reinit-features": Method("relearning-reinit + penultimate-feature distillation (weight 1)",
                                         replace(LABELS, forget="reinit", features=1.0)),
    "relearning-t4": Method("relearning as shipped but temperature 4 (the prototype's)",
                            replace(RelearnConfig(), temperature=4.0)),
    "relearning-nostop": Method("relearning as shipped but no early stopping (all 2000 steps of the cosine schedule; "
                                "the snapshot with the lowest held-out drop is kept)",
                                replace(RelearnConfig(), patience=10**6)),
    "relearning-keep30": Method("relearning as shipped, but each redrawn tensor keeps 30 % of the original "
                                "(shrink and perturb)", replace(RelearnConfig(), keep=0.3)),
    "relearning-keep60": Method("relearning as shipped, but each redrawn tensor keeps 60 % of the original",
                                replace(RelearnConfig(), keep=0.6)),
    "relearning-residual": Method("relearning as shipped, then `scan --data` of the relearnt model and, where it "
                                  "flags a class, adversarial unlearning of that class on the relearnt model within "
                                  "the budget relearning left (removers/residual.py)", RelearnConfig(), residual="scan"),
    "relearning-residuals": Method("one relearning as shipped, then both pickers of `relearning-residual` and "
                                   "`relearning-residual-minimal` on the same relearnt model (rendered as three rows: "
                                   "`relearning (same run)` and the two)", RelearnConfig(), residual="both"),
    "relearning-residual-minimal": Method("relearning-residual, but the minimal-trigger detector "
                                          "(detectors/minimal.py) picks the classes to unlearn",
                                          RelearnConfig(), residual="minimal"),
    "distill-only": Method("no forgetting: distillation from the original's weights (1000 steps)",
                           replace(FULL, forget="none")),
    "pipeline": Method("`clean --data` as shipped (remover auto)",
                       options=lambda path: CleanOptions(data=DataOptions(path=path))),
    "pipeline-flagged": Method("`clean --data --only-if-flagged`",
                               options=lambda path: CleanOptions(data=DataOptions(path=path),
                                                                 removal=RemovalOptions(only_if_flagged=True))),
    "adversarial": Method("`clean --data --remover adversarial` (the previous default with --data)",
                          options=lambda path: CleanOptions(data=DataOptions(path=path),
                                                            removal=RemovalOptions(remover="adversarial"))),
    "previous-default": Method("`clean --data --remover adversarial --only-if-flagged`: the default with --data "
                               "before the relearning remover (scan, then adversarial unlearning of a flagged class)",
                               options=lambda path: CleanOptions(data=DataOptions(path=path),
                                                                 removal=RemovalOptions(remover="adversarial",
                                                                                        only_if_flagged=True))),
    "data-free": Method("`clean` without --data (the data-free scan, then pruning + OT fusion of a flagged class)",
                        options=lambda path: CleanOptions()),
    "finetune": Method(f"plain fine-tuning on the N images labelled by the original: {FINETUNE_STEPS} steps SGD "
                       f"lr {FINETUNE_LR:g} momentum {MOMENTUM}, batch {FINETUNE_BATCH}"),
}


def run_method(name: str, proto, prepared, images: np.ndarray, path: str, robust, sets, before, target) -> dict:
    """One (model, N, method): metrics after, robustness (a)/(b), seconds, refusal."""
    method = METHODS[name]
    began = time.perf_counter()
    refused, extra = None, {}
    module = None
    if method.config is not None:
        try:
            relearned = relearn(prepared, images, MAX_DROP, method.config)
            relearn_seconds = time.perf_counter() - began
            module = prepared.with_weights(relearned.weights)
            kept = relearned.log.kept
            extra = {"forget_steps": relearned.log.forget_steps, "kept_step": kept.step,
                     "holdout_drop": kept.expected_drop, "holdout_agreement": kept.agreement,
                     "dropped": relearned.log.dropped, "relearn_seconds": round(relearn_seconds, 2)}
            if method.residual == "both":  # the relearnt model is the row's; each picker's result beside it
                for picker in ("scan", "minimal"):
                    extra[f"residual_{picker}"] = _picked(prepared, relearned, module, images, path, robust, sets,
                                                          target, picker, before)
            elif method.residual:
                extra.update(_residual(prepared, relearned, module, images, path, robust, sets, target,
                                       method.residual))
                module = prepared.with_weights(extra.pop("weights"))
        except OtbrError as error:
            refused = f"{type(error).__name__}: {' '.join(str(error).split())}"
    elif method.options is not None:
        try:
            result = clean_prepared(prepared, method.options(path))
            if result.changed:
                module = convert(result.model).eval()
            report = result.report
            extra = {"verdict": report.get("verdict"), "changed": result.changed,
                     "scan": report["scan"]["suspected_targets"] if report.get("scan") else None,
                     "evidence": report["scan"]["evidence"] if report.get("scan") else None,
                     "final_scan": (report.get("final_scan") or {}).get("suspected_targets"),
                     "kept": (report.get("removal") or {}).get("kept")}
        except OtbrError as error:
            refused = f"{type(error).__name__}: {' '.join(str(error).split())}"
    else:
        original = convert(proto).eval()
        module = finetune(original, images, predict_torch(original, images), steps=FINETUNE_STEPS,
                          batch=FINETUNE_BATCH, lr=FINETUNE_LR, momentum=MOMENTUM)
    seconds = time.perf_counter() - began
    unchanged = module is None
    module = convert(proto).eval() if module is None else module
    after = before if unchanged else torch_metrics(module, sets, target)
    recal, tuned = robustness(module, robust, sets, target)
    if name in ("relearning", "relearning-residuals"):  # what the user keeps when the budget refuses the relearnt model
        extra["recal_original"], extra["tuned_original"] = robustness(convert(proto).eval(), robust, sets, target)
    rating = der(before, after)
    return {"after": {"acc": after.acc, "asr": after.asr, "der": None if rating is None else 100.0 * rating},
            "recal": recal, "tuned": tuned, "seconds": round(seconds, 2), "refused": refused,
            "unchanged": unchanged, **extra}


def _residual(prepared, relearned, relearnt, images: np.ndarray, path: str, robust, sets, target,
              detector: str) -> dict:
    """``removers.residual.unlearn_residual`` after a relearning: the relearnt model's metrics
    and robustness, what its scan flagged, whether unlearning was kept (and why not)."""
    options = CleanOptions(data=DataOptions(path=path))
    began = time.perf_counter()
    residual = unlearn_residual(prepared, relearned.weights, relearned.log.kept.expected_drop, images, None, options,
                                detector=detector)
    spent = time.perf_counter() - began
    metrics = torch_metrics(relearnt, sets, target)
    recal, tuned = robustness(relearnt, robust, sets, target)
    return {"weights": residual.weights, "relearnt": {"acc": metrics.acc, "asr": metrics.asr}, "relearnt_recal": recal,
            "relearnt_tuned": tuned, "residual_targets": residual.targets, "unlearnt": residual.unlearnt,
            "residual_skipped": residual.skipped, "residual_drop": residual.expected_drop,
            "residual_seconds": round(spent, 2)}


def _picked(prepared, relearned, relearnt, images: np.ndarray, path: str, robust, sets, target, picker: str,
            before) -> dict:
    """One picker's residual unlearning after the shared relearning, scored as a row of its own
    (``expand_residuals``)."""
    found = _residual(prepared, relearned, relearnt, images, path, robust, sets, target, picker)
    module = prepared.with_weights(found.pop("weights"))
    after = torch_metrics(module, sets, target)
    recal, tuned = robustness(module, robust, sets, target)
    rating = der(before, after)
    return {"after": {"acc": after.acc, "asr": after.asr, "der": None if rating is None else 100.0 * rating},
            "recal": recal, "tuned": tuned,
            **{k: found[k] for k in ("residual_targets", "unlearnt", "residual_skipped", "residual_drop",
                                     "residual_seconds")}}


def expand_residuals(rows: list[dict]) -> list[dict]:
    """A ``relearning-residuals`` row as three: the shared relearning (``relearning (same run)``)
    and each picker's result; seconds: the relearning's, plus the picker's search and unlearning.
    A ``relearning-residual(-minimal)`` row also yields the relearning it started from (its
    ``relearnt`` fields; seconds not measured apart), once per model."""
    out, seen = [], set()
    for row in rows:
        if row["method"] in ("relearning-residual", "relearning-residual-minimal") and "relearnt" in row:
            out.append(row)
            if (row["model"], row["n"]) not in seen:
                seen.add((row["model"], row["n"]))
                out.append(_relearnt_row(row))
            continue
        if row["method"] != "relearning-residuals":
            out.append(row)
            continue
        base = {k: v for k, v in row.items() if not k.startswith("residual_")}
        out.append({**base, "method": SAME_RUN, "seconds": row["relearn_seconds"]})
        for picker, name in (("scan", "relearning-residual"), ("minimal", "relearning-residual-minimal")):
            picked = row[f"residual_{picker}"]
            out.append({**base, **picked, "method": name,
                        "seconds": round(row["relearn_seconds"] + picked["residual_seconds"], 2)})
    return out


def _relearnt_row(row: dict) -> dict:
    """The relearnt model a ``relearning-residual`` row started from, as a row of its own."""
    after = {**row["relearnt"], "der": None}
    if row["before"]["asr"] is not None and after["asr"] is not None:
        after["der"] = 100.0 * (max(0.0, row["before"]["asr"] - after["asr"]) / 100.0
                                - max(0.0, row["before"]["acc"] - after["acc"]) / 100.0 + 1.0) / 2.0
    return {**{k: v for k, v in row.items() if not k.startswith("residual") and not k.startswith("relearnt_")
               and k != "relearnt"},
            "method": SAME_RUN, "after": after, "recal": row["relearnt_recal"], "tuned": row["relearnt_tuned"],
            "seconds": None, "unchanged": False, "refused": None}


def clean_floor(spec, split: str, data, log) -> float | None:
    """The ASR a clean model shows on ``spec``'s trigger: the mean over the split's clean models of
    the same architecture (all of the split's clean models where it has none). A removal cannot be
    asked to go below what a model that never saw the trigger does."""
    if not spec.backdoored:
        return None
    cleans = [s for s in SPLITS[split] if not s.backdoored]
    same = [s for s in cleans if s.arch == spec.arch] or cleans
    sets = ((data.x_eval, data.y_eval), poisoned_eval(spec, data))
    return _mean([evaluate(get_model(c, data, log)[0], sets[0], sets[1], spec.target).asr for c in same])


def backdoored(row: dict) -> bool:
    """A model whose attack took (ASR of the original at least ATTACK_MIN_ASR)."""
    return row["before"]["asr"] is not None and row["before"]["asr"] >= ATTACK_MIN_ASR


def failed_attack(row: dict) -> bool:
    return row["before"]["asr"] is not None and not backdoored(row)


def summarise(rows: list[dict]) -> dict:
    bd = [r for r in rows if backdoored(r)]
    cl = [r for r in rows if r["before"]["asr"] is None]
    worst_of = lambda r: max(c["asr"] for c in (r["after"], r["recal"], r["tuned"]) if c is not None)  # noqa: E731
    return {
        "backdoored": len(bd), "clean": len(cl),
        "mean_asr": _mean([r["after"]["asr"] for r in bd]),
        "mean_floor": _mean([r["floor"] for r in bd if r.get("floor") is not None]),
        "worst_asr": max((r["after"]["asr"] for r in bd), default=None),
        "mean_acc_drop": _mean([r["before"]["acc"] - r["after"]["acc"] for r in bd]),
        "mean_der": _mean([r["after"]["der"] for r in bd]),
        "mean_asr_recal": _mean([r["recal"]["asr"] for r in bd if r["recal"] is not None]),
        "mean_asr_tuned": _mean([r["tuned"]["asr"] for r in bd]),
        "cleaned": sum(worst_of(r) <= 10.0 for r in bd),
        "clean_mean_acc_drop": _mean([r["before"]["acc"] - r["after"]["acc"] for r in cl]),
        "clean_worst_acc_drop": max((r["before"]["acc"] - r["after"]["acc"] for r in cl), default=None),
        "refused": sum(r["refused"] is not None for r in rows),
        "mean_seconds": _mean([r["seconds"] for r in rows if r["seconds"] is not None]),
    }


def family_means(rows: list[dict]) -> dict[str, float | None]:
    return {f: _mean([r["after"]["asr"] for r in rows if r["family"] == f and backdoored(r)]) for f in FAMILIES}


SHIPPED = "relearning, as `clean --data` ships"
SAME_RUN = "relearning (same run)"


def as_shipped(rows: list[dict], budget: float) -> list[dict]:
    """What `clean --data` hands back, from the rows of the relearning it ships (``relearning``, or
    ``relearning (same run)`` in a run of ``relearning-residuals``: the same remover, seed and
    images): the relearnt model where its held-out expected accuracy drop is within ``budget``,
    else the original (refused when the scan flags the model, unchanged when it does not: the user
    keeps the original either way). The ``pipeline`` rows run the real thing."""
    method = SAME_RUN if any(r["method"] == SAME_RUN for r in rows) else "relearning"
    shipped = []
    for row in rows:
        if row["method"] != method:
            continue
        if row.get("holdout_drop") is not None and row["holdout_drop"] > budget:
            row = {**row, "after": {**row["before"], "der": 50.0 if row["before"]["asr"] is not None else None},
                   "recal": row.get("recal_original"), "tuned": row.get("tuned_original"),
                   "refused": f"held-out expected drop {row['holdout_drop']:.1f} > {budget:g} points: the original is kept",
                   "unchanged": True}
        shipped.append({**row, "method": SHIPPED})
    return shipped


def render(rows: list[dict], split: str, command: str) -> str:
    keys = [("backdoored", "backdoored"), ("mean ASR", "mean_asr"), ("clean-model ASR", "mean_floor"),
            ("worst ASR", "worst_asr"),
            ("mean ACC drop", "mean_acc_drop"), ("mean DER", "mean_der"), ("mean ASR (a)", "mean_asr_recal"),
            ("mean ASR (b)", "mean_asr_tuned"), ("cleaned (<= 10 after, (a), (b))", "cleaned"),
            ("clean models", "clean"), ("clean: mean ACC drop", "clean_mean_acc_drop"),
            ("clean: worst ACC drop", "clean_worst_acc_drop"), ("refused", "refused"), ("mean s", "mean_seconds")]
    rows = expand_residuals(rows)
    rows = rows + as_shipped(rows, MAX_ACC_DROP["relearning"])
    order = [*METHODS, SAME_RUN, SHIPPED]
    grouped: dict[tuple[str, int], list[dict]] = {}
    for row in sorted(rows, key=lambda r: (order.index(r["method"]), r["n"])):
        grouped.setdefault((row["method"], row["n"]), []).append(row)
    out = [f"# Removal benchmark, {split} split", "",
           f"- Split: `{split}` of benchmarks/split.py ("
           + ("models on which the defaults were chosen" if split == "development"
              else "models never used to choose anything: reported only") + ").",
           f"- Command: `{command}`",
           f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}; versions: {_versions()}",
           "- 2 CPU cores shared with other jobs, one torch thread.",
           f"- User images: N unlabeled Fashion-MNIST test images outside the 2000 evaluation images; robustness: "
           f"{ROBUST_IMAGES} other labelled test images, (a) BatchNorm statistics re-estimated on them (n/a without "
           "BatchNorm nodes), (b) 100 steps SGD lr 1e-3 momentum 0.9 batch 50 on them.",
           f"- Left out of the means (their attack did not take, ASR below {ATTACK_MIN_ASR:g} %): "
           + (", ".join(sorted({f"{r['model']} ({_fmt(r['before']['asr'])} %)" for r in rows if failed_attack(r)}))
              or "none") + ".",
           "- Methods: " + "; ".join(f"`{k}`: {m.note}" for k, m in METHODS.items()
                                     if any(r["method"] == k for r in rows))
           + ("; `relearning (same run)`: the relearnt model those rows started from, before the search"
              if any(r["method"] == SAME_RUN for r in rows) else "") + ".", "",
           "## Summary", "", "| method | N | " + " | ".join(k for k, _ in keys) + " |",
           "| --- | --- |" + " --- |" * len(keys)]
    for (method, n), group in grouped.items():
        s = summarise(group)
        out.append(f"| {method} | {n} | " + " | ".join(
            str(s[k]) if isinstance(s[k], int) else _fmt(s[k]) for _, k in keys) + " |")
    out += ["", "## Mean ASR per trigger family", "", "| method | N | " + " | ".join(FAMILIES) + " |",
            "| --- | --- |" + " --- |" * len(FAMILIES)]
    for (method, n), group in grouped.items():
        out.append(f"| {method} | {n} | " + " | ".join(_fmt(v) for v in family_means(group).values()) + " |")
    out += ["", "## Per model", "", "`clean ASR`: the trigger's ASR on the split's clean models of the same "
            "architecture, what a model that never saw it does.", "",
            "| model | N | method | before ACC / ASR | clean ASR | ACC | ASR | DER | (a) ACC / ASR | "
            "(b) ACC / ASR | s | refused / note |", "|" + " --- |" * 12]
    pair = lambda c: "n/a" if c is None else f"{_fmt(c['acc'])} / {_fmt(c['asr'])}"  # noqa: E731
    for row in sorted(rows, key=lambda r: (r["model"], r["n"], order.index(r["method"]))):
        a = row["after"]
        note = short(row["refused"], 110) if row["refused"] else ("unchanged" if row["unchanged"] else "")
        if row.get("residual_targets"):
            note = (f"relearnt model flagged {row['residual_targets']}: "
                    + ("unlearnt" if row.get("unlearnt") else short(row.get("residual_skipped") or "", 80)))
        out.append(f"| {row['model']} | {row['n']} | {row['method']} | {_fmt(row['before']['acc'])} / "
                   f"{_fmt(row['before']['asr'])} | {_fmt(row.get('floor'))} | {_fmt(a['acc'])} | {_fmt(a['asr'])} | "
                   f"{_fmt(a['der'])} | "
                   f"{pair(row['recal'])} | {pair(row['tuned'])} | {_fmt(row['seconds'])} | {note} |")
    return "\n".join(out) + "\n"


def fill_original(rows: list[dict], path: Path, sizes: tuple[int, ...], log) -> None:
    """The original's ACC/ASR after (a) and (b) for relearning rows written without them (rows of
    ``relearning-residual*`` runs before they recorded it) whose relearnt model the budget refuses;
    the same images and functions as ``run_method``. Rewrites ``path`` with every row."""
    data = load_data()
    specs = {s.name: s for split in SPLITS.values() for s in split}
    with tempfile.TemporaryDirectory(prefix="removal_") as folder:
        robust = user_data(data, sizes, Path(folder)).robust
        for row in rows:
            if (not row["method"].startswith("relearning") or "recal_original" in row
                    or (row.get("holdout_drop") or 0.0) <= MAX_ACC_DROP["relearning"]):
                continue  # only where as_shipped keeps the original
            spec = specs[row["model"]]
            proto, _ = get_model(spec, data, log)
            sets = ((data.x_eval, data.y_eval), poisoned_eval(spec, data))
            row["recal_original"], row["tuned_original"] = robustness(convert(proto).eval(), robust, sets, spec.target)
            log(f"{row['model']} {row['method']}: the original's robustness added")
    path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), required=True)
    parser.add_argument("--models", default=None, help="names, comma-separated (default: the whole split)")
    parser.add_argument("--sizes", default="200")
    parser.add_argument("--methods", default="relearning")
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--fill-original", action="store_true",
                        help="add the original's robustness (what the user keeps where the budget refuses) to the "
                             "--resume rows of relearning methods that lack it, and rewrite that file")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    command = "python benchmarks/removal.py " + " ".join(sys.argv[1:] if argv is None else argv)
    methods = [m for m in args.methods.split(",") if m]
    for name in methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    specs = [s for s in SPLITS[args.split] if args.models is None or s.name in args.models.split(",")]
    sizes = tuple(int(n) for n in args.sizes.split(","))
    rows = [r for r in read_rows(args.resume) if r["split"] == args.split]
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f}s] {message}", file=sys.stderr, flush=True)

    if args.fill_original:
        fill_original(read_rows(args.resume), args.resume, sizes, log)  # every split's rows, rewritten
        rows = [r for r in read_rows(args.resume) if r["split"] == args.split]
    if not args.render_only and not args.fill_original:
        torch.set_num_threads(1)
        data = load_data()
        done = {(r["model"], r["n"], r["method"]) for r in rows}
        with tempfile.TemporaryDirectory(prefix="removal_") as folder:
            users = user_data(data, sizes, Path(folder))
            for spec in specs:
                todo = [(n, m) for n in sizes for m in methods if (spec.name, n, m) not in done]
                if not todo:
                    continue
                proto, _ = get_model(spec, data, log)
                sets = ((data.x_eval, data.y_eval), poisoned_eval(spec, data))
                before = evaluate(proto, sets[0], sets[1], spec.target)
                prepared = prepare(proto, CleanOptions())
                floor = clean_floor(spec, args.split, data, log)
                for n, method in todo:
                    row = {"split": args.split, "model": spec.name, "family": spec.family, "target": spec.target,
                           "n": n, "method": method, "before": before.as_dict(), "floor": floor}
                    try:
                        row.update(run_method(method, proto, prepared, users.images[n], users.paths[n], users.robust,
                                              sets, before, spec.target))
                    except Exception as error:  # noqa: BLE001 - one failure must not end a long run
                        row["error"] = f"{type(error).__name__}: {short(error, 200)}"
                    rows.append(row)
                    if row.get("error"):
                        log(f"ERROR {spec.name} {method}: {row['error']}")
                    else:
                        a = row["after"]
                        log(f"{spec.name} N={n} {method}: ACC {_fmt(before.acc)} -> {_fmt(a['acc'])} ASR "
                            f"{_fmt(before.asr)} -> {_fmt(a['asr'])} (a) {row['recal'] and _fmt(row['recal']['asr'])} "
                            f"(b) {_fmt(row['tuned']['asr'])} {row['seconds']:.0f}s "
                            f"{short(row['refused'], 120) if row['refused'] else ''}")
                    if args.resume is not None:
                        with args.resume.open("a") as handle:
                            handle.write(json.dumps(row, default=str) + "\n")
    rows = [r for r in rows if r.get("error") is None]
    if args.out is not None:
        args.out.write_text(render(rows, args.split, command))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
