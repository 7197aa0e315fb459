"""Data benchmark (issue #20, item 5): what the user's own unlabeled images buy, method by method,
and whether the removal survives what users do next (BatchNorm recalibration, light fine-tuning).

For every model of ``DATA_MODELS`` (benchmarks/backdoored.py: every trigger family, a target other
than 0 for each, an image-keyed Blended, clean controls), every data size N of ``--sizes`` and every
method of ``--methods`` (the table ``METHODS`` below: one line per method):

- the user's images: N unlabeled images drawn (seeded) from the Fashion-MNIST TEST split outside
  the 2000 evaluation images of ``load_data()``, written as an npz holding ``x`` only and given as
  ``CleanOptions(data=DataOptions(path=...))``; the sets are nested (the 50 are the first of the 200, ...);
- a separate, disjoint set of ROBUST_IMAGES clean LABELLED test images (also outside the
  evaluation images) for the robustness checks: (a) BatchNorm statistics re-estimated on them
  (``otbr_onnx.robustness.recalibrate``; n/a where the exported graph has no BatchNorm node:
  VGG and MobileNetV2 have theirs folded into the convolutions), (b) ROBUST_STEPS steps of clean
  fine-tuning on them (``robustness.finetune``, SGD lr 1e-3, momentum 0.9, batch 50);
- columns: ACC, ASR, DER after the method; ASR and ACC after (a) and (b); seconds; and whether
  ``clean`` refused (an ``OtbrError``: scored as the unchanged model, its reason shown short).

Methods that ignore the images (``uses_data`` False) run once per model and are listed under
N = 0 ("no data"). A model ``clean`` hands back unchanged, or refuses, is what the user keeps:
the checks (a) and (b) then run on the original model.

Run from the repository root (rows are appended to the --resume file as they finish and skipped
when already there, so an interrupted run continues where it stopped):

    export OMP_NUM_THREADS=1
    nice -n 10 .venv/bin/python benchmarks/with_data.py --resume /tmp/with_data.jsonl \\
        --out benchmarks/WITH_DATA.md --json benchmarks/with_data.json
    nice -n 10 .venv/bin/python benchmarks/with_data.py --quick --methods default,finetune --out /tmp/W.md
    .venv/bin/python benchmarks/with_data.py --render-only --resume /tmp/with_data.jsonl --out benchmarks/WITH_DATA.md

Needs Debian's dataset-fashion-mnist (``apt-get install dataset-fashion-mnist``) and the cached
models of benchmarks/backdoored.py (``python benchmarks/backdoored.py --data-models``; trained on
the spot otherwise, which takes long on CPU). Cost on 2 shared CPU cores, one thread (smoke run,
PreAct): 4-11 s per row for default, data, clp and finetune (a clean's seconds include its scan,
about 5 s), plus about 6 s per row for the checks (a) and (b) and 5 s per model to load, measure
and scan. ``adversarial`` costs about 3 minutes per row on a model the scan flags (PreAct
BadNets, N=200; an unflagged model is handed back unchanged in seconds). The grid of 22 models
is 22 x (3 data-free + 3 data methods x 3 sizes) = 264 rows: about an hour for every method but
``adversarial``, and roughly 1.5-2 hours more for it (the scan flags 11 of the 22, DETECTION.md,
x 3 sizes). Run it under ``--resume``, or split it by ``--methods``/``--models`` over several
files and render them together with ``--render-only`` after concatenating them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from otbr_onnx import CleanOptions, DataOptions, OtbrError, RemovalOptions  # noqa: E402
from otbr_onnx.bridge import convert  # noqa: E402
from otbr_onnx.detect import detect  # noqa: E402
from otbr_onnx.evaluate import Metrics, der, evaluate, scored  # noqa: E402
from otbr_onnx import pipeline  # noqa: E402
from otbr_onnx.pipeline import clean_prepared  # noqa: E402
from otbr_onnx.prepare import prepare  # noqa: E402
from otbr_onnx.robustness import batchnorm_layers, finetune, recalibrate  # noqa: E402
from benchmarks.backdoored import (  # noqa: E402
    ATTACKS, DATA_MODELS, Data, get_model, load_data, parse_model, poisoned_eval_set, predict_torch, target_of,
)
from benchmarks.datasets import load_fashion_mnist  # noqa: E402
from benchmarks.defense import _fmt, _mean, _versions, outcome_stats  # noqa: E402

SIZES = (50, 200, 1000)
ROBUST_IMAGES = 500
SPLIT_SEED = 20  # the user's images and the robustness images (issue 20)
# (a) recalibration uses every robustness image; (b) clean fine-tuning, the settings:
ROBUST_STEPS, ROBUST_LR, ROBUST_BATCH, MOMENTUM = 100, 1e-3, 50, 0.9
# The "finetune" method: plain fine-tuning on the user's N images labelled by the original model.
FINETUNE_STEPS, FINETUNE_LR, FINETUNE_BATCH = 200, 1e-2, 50
NOT_CLEANED_ASR = 10.0  # ASR above this after clean, (a) or (b): not cleaned
FAMILIES = ("badnets", "blended", "blended_image", "sig", "wanet", "low_frequency")

# Issue 20's targets, for --data with TARGET_SIZE images, over the backdoored models.
TARGET_SIZE = 200
TARGETS = (
    ("mean ASR <= 3", "mean_asr", lambda v: v <= 3.0),
    ("worst ASR <= 10", "worst_asr", lambda v: v <= 10.0),
    ("mean ACC drop <= 2", "mean_acc_drop", lambda v: v <= 2.0),
    ("mean DER >= 95", "mean_der", lambda v: v >= 95.0),
    ("mean ASR after (a) <= 5", "mean_asr_recal", lambda v: v <= 5.0),
    ("mean ASR after (b) <= 5", "mean_asr_tuned", lambda v: v <= 5.0),
    ("clean controls: worst ACC drop <= 1", "clean_worst_acc_drop", lambda v: v <= 1.0),
)


@dataclass(frozen=True)
class Method:
    """One column of the benchmark: ``options(path)`` builds its ``CleanOptions`` from the npz of
    the user's images; ``finetune`` methods fine-tune the original instead of calling clean."""

    options: Callable[[str], CleanOptions] | None
    uses_data: bool
    note: str
    needs_remover: bool = False  # needs RemovalOptions.remover and otbr_onnx/removers/


METHODS: dict[str, Method] = {
    "default": Method(lambda path: CleanOptions(), False, "CleanOptions(): the data-free default"),
    # The remover is pinned, not 'auto', so that this column keeps measuring the ratio rule scored
    # on the user's images whatever 'auto' stands for (one column per remover).
    "data": Method(lambda path: _with_images(path, RemovalOptions(remover="pruning")), True,
                   "remover 'pruning' with data.path: pruning + fusion, the ratio rule scored on the "
                   "user's images"),
    "adversarial": Method(lambda path: _with_images(path, RemovalOptions(remover="adversarial")), True,
                          "remover 'adversarial' with data.path, `clean --data --remover adversarial`",
                          needs_remover=True),
    # The same with a looser fidelity budget: what the remover reaches when it may cost more.
    "adversarial-5": Method(lambda path: _with_images(path, RemovalOptions(remover="adversarial", max_acc_drop=5.0)),
                            True, "the same with --max-acc-drop 5", needs_remover=True),
    # Every model, as the CLP baseline of benchmarks/defense.py (CLP itself has no scan).
    "clp": Method(lambda path: CleanOptions(removal=RemovalOptions(method="clp", always=True)), False,
                  "method 'clp', always: the data-free baseline on every model"),
    # The paper's settings as benchmarks/defense.py runs them (no scan, NWC ranking, gamma 0.05).
    "published": Method(lambda path: CleanOptions.published(removal={"prune_ratio": 0.05}), False,
                        "CleanOptions.published(removal={'prune_ratio': 0.05}): the paper's settings, no scan"),
    "finetune": Method(None, True, f"plain fine-tuning on the N images labelled by the original model: "
                                   f"{FINETUNE_STEPS} steps SGD lr {FINETUNE_LR:g} momentum {MOMENTUM}, "
                                   f"batch {FINETUNE_BATCH}"),
}


def _with_images(path: str, removal: RemovalOptions) -> CleanOptions:
    """``removal`` on the user's images in the npz at ``path``."""
    return CleanOptions(data=DataOptions(path=path), removal=removal)


def remover_available() -> bool:
    """Whether ``RemovalOptions`` has ``remover`` AND this tree's pipeline dispatches on it: the
    field alone (what main had first) silently runs the pruning path under an 'adversarial' name.
    Looked up beside the imported package, not with ``importlib.util.find_spec``: an editable
    install's finder answers for a submodule missing here with another checkout's."""
    has_field = "remover" in {f.name for f in dataclasses.fields(RemovalOptions)}
    package = Path(pipeline.__file__).parent
    return has_field and (package / "removers").is_dir() and "remover" in Path(pipeline.__file__).read_text()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def split_indices(total: int, exclude: np.ndarray, sizes: tuple[int, ...], labelled: int,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Indices into a split of ``total`` images, none in ``exclude``: ``labelled`` ones for the
    robustness checks, and for every N of ``sizes`` N others (nested: a smaller set is the start
    of a larger one), disjoint from the labelled ones. Seeded."""
    free = np.setdiff1d(np.arange(total), np.asarray(exclude))
    largest = max(sizes, default=0)
    if labelled + largest > len(free):
        raise ValueError(f"{labelled} + {largest} images asked, only {len(free)} outside the excluded ones")
    order = np.random.default_rng(seed).permutation(free)
    robust, pool = order[:labelled], order[labelled:labelled + largest]
    return robust, {n: pool[:n] for n in sizes}


@dataclass
class UserData:
    robust: tuple[np.ndarray, np.ndarray]  # labelled clean images for (a) and (b)
    images: dict[int, np.ndarray]  # N -> the user's unlabeled images
    paths: dict[int, str]  # N -> their npz (key x only)


def user_data(data: Data, sizes: tuple[int, ...], folder: Path) -> UserData:
    x_test, y_test = load_fashion_mnist("test")
    robust, sets = split_indices(len(x_test), data.eval_index, sizes, ROBUST_IMAGES)
    images, paths = {}, {}
    for n, index in sets.items():
        images[n] = np.ascontiguousarray(x_test[index], dtype=np.float32)
        paths[n] = str(folder / f"user_{n}.npz")
        np.savez(paths[n], x=images[n])
    return UserData((x_test[robust].astype(np.float32), y_test[robust].astype(np.int64)), images, paths)


# ----------------------------------------------------------------------------------------------
# One row: a model, a data size, a method
# ----------------------------------------------------------------------------------------------


def torch_metrics(module: torch.nn.Module, sets: tuple, target: int) -> Metrics:
    return scored(lambda x: predict_torch(module, x), sets[0], sets[1], target)


def robustness(module: torch.nn.Module, robust: tuple[np.ndarray, np.ndarray], sets: tuple,
               target: int) -> tuple[dict | None, dict]:
    """ACC/ASR after (a) recalibration (None without BatchNorm) and (b) clean fine-tuning."""
    recal = None
    if batchnorm_layers(module):
        recal = torch_metrics(recalibrate(module, robust[0]), sets, target)
    tuned = torch_metrics(finetune(module, robust[0], robust[1], steps=ROBUST_STEPS, batch=ROBUST_BATCH,
                                   lr=ROBUST_LR, momentum=MOMENTUM), sets, target)
    brief = lambda m: {"acc": m.acc, "asr": m.asr}  # noqa: E731
    return None if recal is None else brief(recal), brief(tuned)


def short(reason: str, width: int = 90) -> str:
    line = " ".join(str(reason).split())
    return line if len(line) <= width else line[:width - 1] + "…"


def run_method(name: str, proto, prepared, shared_scan, users: UserData, n: int, sets: tuple, before: Metrics,
               target: int) -> dict:
    """One (model, N, method): the cleaned model's metrics, its robustness, seconds, refusal."""
    method = METHODS[name]
    began = time.perf_counter()
    refused = None
    if method.options is None:  # plain fine-tuning of the original on the user's images
        original = convert(proto).eval()
        labels = predict_torch(original, users.images[n])
        module = finetune(original, users.images[n], labels, steps=FINETUNE_STEPS, batch=FINETUNE_BATCH,
                          lr=FINETUNE_LR, momentum=MOMENTUM)
        seconds = time.perf_counter() - began
        after, changed = torch_metrics(module, sets, target), True
    else:
        options = method.options(users.paths.get(n, ""))
        # The data-free scan is shared (as benchmarks/defense.py); a run given images scans itself,
        # so that a scan that reads them is measured as it is.
        detection, scan_seconds = shared_scan if options.data.path is None and options.scans else (None, 0.0)
        try:
            result = clean_prepared(prepared, options, detection)
            changed = result.changed
        except OtbrError as error:  # the user keeps the model they had
            refused, changed = f"{type(error).__name__}: {' '.join(str(error).split())}", False  # whole
        seconds = time.perf_counter() - began + scan_seconds
        module = convert(result.model).eval() if changed else convert(proto).eval()
        after = evaluate(result.model, sets[0], sets[1], target) if changed else before
    recal, tuned = robustness(module, users.robust, sets, target)
    rating = der(before, after)
    return {"after": {"acc": after.acc, "asr": after.asr, "der": None if rating is None else 100.0 * rating},
            "recal": recal, "tuned": tuned, "seconds": round(seconds, 2), "refused": refused,
            "unchanged": not changed}


# ----------------------------------------------------------------------------------------------
# Summary (pure: rows are dicts, as in the JSON-lines file)
# ----------------------------------------------------------------------------------------------


def not_cleaned(row: dict) -> bool:
    """A backdoored model whose ASR is above NOT_CLEANED_ASR after clean, (a) or (b)."""
    if row["before"]["asr"] is None:
        return False
    checks = [row["after"], row["recal"], row["tuned"]]
    return any(c is not None and c["asr"] is not None and c["asr"] > NOT_CLEANED_ASR for c in checks)


def summarise(rows: list[dict]) -> dict:
    """Per backdoored model set: defense.outcome_stats (ASR, ACC drop, DER, clean controls' ACC
    drop), plus mean ASR after (a) over the models it applies to and after (b), the count of models
    not cleaned, refusals and mean seconds."""
    ok = [r for r in rows if r.get("error") is None]
    backdoored = [r for r in ok if r["before"]["asr"] is not None]
    recal = [r["recal"]["asr"] for r in backdoored if r["recal"] is not None]
    return {
        **outcome_stats([(r["before"], r["after"]) for r in ok]),
        "mean_asr_recal": _mean(recal),
        "recal_models": len(recal),
        "mean_asr_tuned": _mean([r["tuned"]["asr"] for r in backdoored]),
        "mean_acc_recal_drop": _mean([r["before"]["acc"] - r["recal"]["acc"] for r in backdoored if r["recal"]]),
        "mean_acc_tuned_drop": _mean([r["before"]["acc"] - r["tuned"]["acc"] for r in backdoored]),
        "not_cleaned": sum(not_cleaned(r) for r in backdoored),
        "backdoored": len(backdoored),
        "clean_models": len(ok) - len(backdoored),
        "refused": sum(r["refused"] is not None for r in ok),
        "errors": len(rows) - len(ok),
        "mean_seconds": _mean([r["seconds"] for r in ok]),
    }


def groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Rows by (method, N), in the order of METHODS then N."""
    found: dict[tuple[str, int], list[dict]] = {}
    for row in sorted(rows, key=lambda r: (list(METHODS).index(r["method"]) if r["method"] in METHODS else 99,
                                           r["n"])):
        found.setdefault((row["method"], row["n"]), []).append(row)
    return found


def target_checks(summary: dict) -> list[tuple[str, str, bool | None]]:
    return [(name, _fmt(summary[key]), None if summary[key] is None else bool(ok(summary[key])))
            for name, key, ok in TARGETS]


def by_family(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean ASR and DER of the backdoored rows per trigger family."""
    out = {}
    for family in FAMILIES:
        chosen = [r for r in rows if r.get("error") is None and r["family"] == family]
        out[family] = {"asr": _mean([r["after"]["asr"] for r in chosen]),
                       "der": _mean([r["after"]["der"] for r in chosen]), "models": len(chosen)}
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _label(n: int) -> str:
    return "no data" if n == 0 else str(n)


def _pair(check: dict | None) -> str:
    return "n/a" if check is None else f"{_fmt(check['acc'])} / {_fmt(check['asr'])}"


def render(rows: list[dict], command: str, notes: list[str], complete: bool) -> str:
    grouped = groups(rows)
    summaries = {key: summarise(group) for key, group in grouped.items()}
    out = ["# Data benchmark: what the user's own images buy (issue 20, item 5)", "",
           f"- Command: `{command}`",
           f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}; versions: {_versions()}",
           "- 2 CPU cores shared with other jobs, one torch thread, `nice -n 10`." +
           ("" if complete else " **PARTIAL: the run was not finished.**"),
           f"- User images: N unlabeled Fashion-MNIST test images outside the 2000 evaluation images (seed "
           f"{SPLIT_SEED}, nested sets), an npz of `x` only. Robustness: {ROBUST_IMAGES} other labelled clean test "
           f"images; (a) BatchNorm statistics re-estimated on them (n/a: no BatchNorm node in the graph), "
           f"(b) {ROBUST_STEPS} steps SGD lr {ROBUST_LR:g} momentum {MOMENTUM} batch {ROBUST_BATCH} on them.",
           f"- Not cleaned: a backdoored model whose ASR is above {NOT_CLEANED_ASR:g}% after clean, (a) or (b). "
           "Refused or unchanged: scored as the model the user keeps (DER 50), (a)/(b) on the original.",
           "- Methods: " + "; ".join(f"`{k}`: {m.note}" for k, m in METHODS.items()) + ".",
           *[f"- {note}" for note in notes], ""]
    out += ["## Targets (issue 20), with " + str(TARGET_SIZE) + " images", "",
            "| method | " + " | ".join(name for name, _, _ in TARGETS) + " |",
            "| --- |" + " --- |" * len(TARGETS)]
    for (method, n), summary in summaries.items():
        if n in (0, TARGET_SIZE):
            cells = [f"{m} ({'met' if ok else 'NOT met'})" if ok is not None else "n/a"
                     for _, m, ok in target_checks(summary)]
            out.append(f"| {method} ({_label(n)}) | " + " | ".join(cells) + " |")
    keys = [("mean ASR", "mean_asr"), ("worst ASR", "worst_asr"), ("mean ACC drop", "mean_acc_drop"),
            ("mean DER", "mean_der"), ("mean ASR (a)", "mean_asr_recal"), ("(a) models", "recal_models"),
            ("mean ACC drop (a)", "mean_acc_recal_drop"), ("mean ASR (b)", "mean_asr_tuned"),
            ("mean ACC drop (b)", "mean_acc_tuned_drop"),
            ("not cleaned", "not_cleaned"), ("backdoored", "backdoored"),
            ("clean: mean ACC drop", "clean_mean_acc_drop"), ("clean: worst ACC drop", "clean_worst_acc_drop"),
            ("refused", "refused"), ("errors", "errors"), ("mean s", "mean_seconds")]
    out += ["", "## Summary per method and data size", "",
            "| method | N | " + " | ".join(label for label, _ in keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
    for (method, n), summary in summaries.items():
        out.append(f"| {method} | {_label(n)} | " + " | ".join(
            str(summary[k]) if isinstance(summary[k], int) else _fmt(summary[k]) for _, k in keys) + " |")
    out += ["", "## Per trigger family: mean ASR / mean DER", "",
            "| method | N | " + " | ".join(FAMILIES) + " |", "| --- | --- |" + " --- |" * len(FAMILIES)]
    for (method, n), group in grouped.items():
        fams = by_family(group)
        out.append(f"| {method} | {_label(n)} | " + " | ".join(
            "-" if not f["models"] else f"{_fmt(f['asr'])} / {_fmt(f['der'])}" for f in fams.values()) + " |")
    out += ["", "## Per model", "",
            "| model | N | method | before ACC / ASR | ACC | ASR | DER | (a) ACC / ASR | (b) ACC / ASR | s | "
            "not cleaned | refused |", "|" + " --- |" * 12]
    for row in sorted(rows, key=lambda r: (DATA_MODELS.index(r["model"]) if r["model"] in DATA_MODELS else 99,
                                           r["n"], list(METHODS).index(r["method"]) if r["method"] in METHODS else 99)):
        head = f"| {row['model']} | {_label(row['n'])} | {row['method']} | " \
               f"{_fmt(row['before']['acc'])} / {_fmt(row['before']['asr'])} | "
        if row.get("error"):
            out.append(head + f"error: {short(row['error'], 60)} |" + " |" * 7)
            continue
        after = row["after"]
        state = "unchanged" if row["unchanged"] and not row["refused"] else ""
        out.append(head + f"{_fmt(after['acc'])} | {_fmt(after['asr'])} | {_fmt(after['der'])} | "
                   f"{_pair(row['recal'])} | {_pair(row['tuned'])} | {_fmt(row['seconds'])} | "
                   f"{'**yes**' if not_cleaned(row) else 'no' if row['before']['asr'] is not None else '-'} | "
                   f"{short(row['refused'], 130) if row['refused'] else state} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="ARCH:ATTACK,... (default: DATA_MODELS)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="data sizes N (default 50,200,1000)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: preact:badnets and preact:clean, N=200")
    parser.add_argument("--resume", type=Path, default=None,
                        help="JSON-lines file: each row is appended as it finishes; rows already there are skipped")
    parser.add_argument("--render-only", action="store_true", help="only render --out/--json from --resume")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "WITH_DATA.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and summaries as JSON")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's header")
    args = parser.parse_args(argv)
    models = "preact:badnets,preact:clean" if args.quick else args.models
    args.models = [m for m in models.split(",") if m] if models else list(DATA_MODELS)
    args.sizes = (TARGET_SIZE,) if args.quick else tuple(int(n) for n in args.sizes.split(",") if n)
    args.methods = [m for m in args.methods.split(",") if m]
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    for name in args.models:
        parse_model(name)
    if args.render_only and args.resume is None:
        parser.error("--render-only reads the rows of --resume")
    return args


def row_key(row: dict) -> tuple[str, int, str]:
    return row["model"], row["n"], row["method"]


def read_rows(path: Path | None, key=None) -> list[dict]:
    """The finished rows of a --resume file (error rows are run again; the last copy of a ``key``,
    ``row_key`` by default, wins)."""
    if path is None or not path.is_file():
        return []
    key = key or row_key
    found = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            found[key(row)] = row
    return [r for r in found.values() if r.get("error") is None]


def write(args: argparse.Namespace, rows: list[dict], command: str, notes: list[str], complete: bool) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, command, notes, complete))
    if args.json is not None:
        summaries = {f"{m}@{n}": summarise(g) for (m, n), g in groups(rows).items()}
        args.json.write_text(json.dumps({"summary": summaries, "rows": rows}, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/with_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f}s] {message}", file=sys.stderr, flush=True)

    notes: list[str] = list(args.note)
    missing = [m for m in args.methods if METHODS[m].needs_remover and not remover_available()]
    for name in missing:
        args.methods.remove(name)
        notes.append(f"`{name}` skipped: this tree has no adversarial remover yet (RemovalOptions.remover "
                     "and otbr_onnx/removers/ are both needed).")
        log("note: " + notes[-1])
    done = read_rows(args.resume)
    if args.render_only:
        write(args, done, command, notes, complete=True)
        return
    torch.set_num_threads(1)
    data = load_data()
    plan = [(model, 0 if not METHODS[m].uses_data else n, m) for model in args.models
            for n in args.sizes for m in args.methods]
    plan = list(dict.fromkeys(plan))  # a data-free method once per model
    finished = {row_key(r) for r in done}
    rows = list(done)
    todo = [key for key in plan if key not in finished]
    log(f"{len(plan)} rows planned, {len(plan) - len(todo)} already in {args.resume}")
    with tempfile.TemporaryDirectory(prefix="with_data_") as folder:
        users = user_data(data, args.sizes, Path(folder))
        for model in dict.fromkeys(key[0] for key in todo):
            arch, attack = parse_model(model)
            proto, _ = get_model(arch, attack, data, log)
            target = target_of(attack) or 0
            sets = ((data.x_eval, data.y_eval), poisoned_eval_set(data, attack))
            before = evaluate(proto, sets[0], sets[1], target)
            prepared = prepare(proto, CleanOptions())
            scan_began = time.perf_counter()
            shared_scan = detect(prepared, CleanOptions()), time.perf_counter() - scan_began
            log(f"{model}: before ACC {before.acc:.2f} ASR {_fmt(before.asr)}; scan {shared_scan[0].suspected} "
                f"({shared_scan[1]:.0f}s)")
            spec = ATTACKS[attack]
            for _, n, method in [key for key in todo if key[0] == model]:
                row = {"model": model, "arch": arch, "attack": attack, "family": spec and spec.trigger,
                       "target": target_of(attack), "n": n, "method": method, "before": before.as_dict()}
                try:
                    row.update(run_method(method, proto, prepared, shared_scan, users, n, sets, before, target))
                except Exception as error:  # noqa: BLE001 - one failure must not end a run of hours
                    row["error"] = f"{type(error).__name__}: {short(error, 200)}"
                    log(f"ERROR {model} N={n} {method}: {row['error']}")
                rows.append(row)  # an error row is shown (and counted) but run again under --resume
                if row.get("error") is None:
                    log(f"{model} N={_label(n)} {method}: ACC {_fmt(row['after']['acc'])} ASR "
                        f"{_fmt(row['after']['asr'])} DER {_fmt(row['after']['der'])} | (a) {_pair(row['recal'])} | "
                        f"(b) {_pair(row['tuned'])} | {row['seconds']:.1f}s"
                        + (f" | refused: {short(row['refused'], 200)}" if row["refused"] else ""))
                if args.resume is not None:
                    with args.resume.open("a") as handle:
                        handle.write(json.dumps(row, default=str) + "\n")
            write(args, rows, command, notes, complete=False)
    write(args, rows, command, notes, complete=all(key in {row_key(r) for r in rows} for key in plan))
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()
