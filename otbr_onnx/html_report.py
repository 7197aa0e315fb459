"""One self-contained HTML page from a JSON report (``report.py``), for the reviewer who must see
in a minute why a model was flagged or changed.

The page: the verdict in one sentence; a few of the user's images with the original's and the
cleaned model's answers (``clean --data``); the per-class maximum margins before and after cleaning
(suspected classes highlighted); the ranked neurons' score histogram with the pruning cut; the
candidate prune ratios with their fidelity and rescan scores; the parity figures; the time per
stage. Figures are drawn by matplotlib (Agg, optional extra ``[html]``) as SVG and embedded as
``data:`` images, so the file needs no network, and a script smuggled into a figure's text could
not run even if it got through (an SVG shown as an image runs no script). Every string from the
report passes ``html.escape``; a Content-Security-Policy forbids scripts and remote loads anyway.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from otbr_onnx.errors import UsageError, printable

MISSING_MATPLOTLIB = "--html needs matplotlib: pip install 'otbr-onnx[html]'"
SUSPECTED, BEFORE, AFTER, PRUNED, KEPT = "#c0392b", "#5b7fa6", "#9bbf85", "#c0392b", "#8a9bb0"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 60rem;
       padding: 0 1rem; color: #1d2733; line-height: 1.45; }
h1 { font-size: 1.3rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.1rem; border-bottom: 1px solid #d5dbe3; padding-bottom: 0.2rem; margin-top: 2rem; }
.verdict { font-size: 1.15rem; font-weight: 600; padding: 0.7rem 1rem; border-radius: 6px;
           background: #eef3f8; border-left: 6px solid #5b7fa6; overflow-wrap: anywhere; }
.verdict.alert { background: #fbeeec; border-left-color: #c0392b; }
.meta, .note { color: #556270; font-size: 0.9rem; overflow-wrap: anywhere; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #556270; font-size: 0.85rem; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border: 1px solid #d5dbe3; padding: 0.2rem 0.6rem; text-align: right; }
th { background: #f3f5f8; }
td.text, th.text { text-align: left; overflow-wrap: anywhere; }
tr.suspected td { background: #fbeeec; font-weight: 600; }
tr.chosen td { background: #eef6ea; font-weight: 600; }
"""


def require_matplotlib() -> None:
    """Fail fast, before a long clean, where the ``[html]`` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise UsageError(MISSING_MATPLOTLIB) from error


def _e(value) -> str:
    """Text from the report, safe in HTML: escaped, and control characters (terminal escapes from a
    hostile model's names) shown as visible escapes rather than passed on raw."""
    return html.escape(printable(str(value)), quote=True)


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _sci(value) -> str:
    return "–" if value is None else f"{value:.2e}"


# --- figures ------------------------------------------------------------------------------------------


@contextmanager
def _figure(width: float, height: float) -> Iterator:
    """A matplotlib figure on its own Agg canvas: no pyplot, so no global backend switch in the
    caller's process and no display needed; the SVG is the same for the same report (fixed hash
    salt, no date)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "otbr-onnx", "font.size": 9}):
        figure = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(figure)
        yield figure


def _image(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/svg+xml;base64,{data}" alt="{_e(alt)}">'


def _figure_block(image: str, caption: str) -> str:
    return f"<figure>{image}<figcaption>{_e(caption)}</figcaption></figure>"


def margins_figure(scan: dict, rescan: dict | None, title: str) -> str:
    import numpy as np

    with _figure(8, 3.2) as fig:
        ax = fig.add_subplot()
        classes = [row["class"] for row in scan["classes"]]
        suspected = set(scan["suspected_targets"])
        x = np.arange(len(classes))
        width = 0.4 if rescan else 0.8
        colours = [SUSPECTED if c in suspected else BEFORE for c in classes]
        ax.bar(x - (width / 2 if rescan else 0), [row["max_margin"] for row in scan["classes"]], width,
               color=colours, label="before (scan)")
        if rescan:
            ax.bar(x + width / 2, [row["max_margin"] for row in rescan["classes"]], width, color=AFTER,
                   label="after (rescan)")
        ax.set_xticks(x, [str(c) for c in classes])
        ax.set_xlabel("class")
        ax.set_ylabel("maximum margin")
        ax.set_title(title, parse_math=False)  # a "$" in a file name is not mathtext
        handles, labels = ax.get_legend_handles_labels()
        if suspected:
            from matplotlib.patches import Patch

            handles.append(Patch(color=SUSPECTED))
            labels.append("suspected target (before)")
        ax.legend(handles, labels, fontsize=8)
        return _image(fig, "bar chart of the per-class maximum margins")


def scores_figure(histogram: dict, source: str) -> str:
    import numpy as np

    with _figure(8, 3) as fig:
        ax = fig.add_subplot()
        edges = np.asarray(histogram["edges"])
        widths, left = np.diff(edges), edges[:-1]
        ax.bar(left, histogram["kept"], widths, align="edge", color=KEPT, label="kept")
        ax.bar(left, histogram["pruned"], widths, bottom=histogram["kept"], align="edge", color=PRUNED,
               label="pruned")
        if histogram["cut"] is not None:
            ax.axvline(histogram["cut"], color="#1d2733", linestyle="--", label=f"cut ({histogram['cut']:.3g})")
        ax.set_xlabel(f"{source} score")
        ax.set_ylabel("neurons")
        ax.legend(fontsize=8)
        return _image(fig, "histogram of the neuron scores with the pruning cut")


def ratios_figure(selection: dict, threshold: float | None) -> str:
    with _figure(8, 3) as fig:
        ax = fig.add_subplot()
        trials = selection["trials"]
        positions = list(range(len(trials)))
        ax.plot(positions, [t["score"] for t in trials], "o-", color=BEFORE,
                label=f"fidelity ({selection['metric']}, %)")
        floor = selection["baseline"] - selection["budget"]
        ax.axhline(floor, color=BEFORE, linestyle=":", label=f"fidelity floor ({floor:.1f}%)")
        ax.set_xticks(positions, [f"{t['strength']:g}" for t in trials])
        ax.set_xlabel("prune ratio (gamma)")
        ax.set_ylabel("fidelity (%)")
        lines, labels = ax.get_legend_handles_labels()
        if any("target_z" in t for t in trials):
            twin = ax.twinx()
            twin.plot(positions, [t.get("target_z") for t in trials], "s--", color=SUSPECTED,
                      label="rescan z of the target")
            if threshold is not None:
                twin.axhline(threshold, color=SUSPECTED, linestyle=":", label=f"scan threshold (z {threshold:g})")
            twin.set_ylabel("rescan z")
            more_lines, more_labels = twin.get_legend_handles_labels()
            lines, labels = lines + more_lines, labels + more_labels
        chosen = selection["chosen_strength"]
        if chosen is not None:
            ax.axvline(next(i for i, t in enumerate(trials) if t["strength"] == chosen), color=AFTER, linewidth=6,
                       alpha=0.4)
        ax.legend(lines, labels, fontsize=8, loc="lower left")
        return _image(fig, "fidelity and rescan score of each candidate prune ratio")


def parity_figure(parity: dict) -> str:
    rows = [(name, p) for name, p in parity.items() if p is not None]
    with _figure(8, 0.6 + 0.5 * len(rows)) as fig:
        ax = fig.add_subplot()
        y = list(range(len(rows)))
        ax.barh([v - 0.2 for v in y], [max(p["max_abs"], 1e-12) for _, p in rows], 0.4, color=BEFORE,
                label="max abs difference")
        ax.barh([v + 0.2 for v in y], [max(p["tolerance"], 1e-12) for _, p in rows], 0.4, color=KEPT,
                label="tolerance")
        ax.set_yticks(y, [name for name, _ in rows])
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never on them
        return _image(fig, "parity: largest output difference against its tolerance")


def time_figure(seconds: dict) -> str:
    with _figure(8, 0.6 + 0.35 * len(seconds)) as fig:
        ax = fig.add_subplot()
        names = list(seconds)
        ax.barh(range(len(names)), [seconds[n] for n in names], color=BEFORE)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        return _image(fig, "time per stage")


# --- sections -----------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[tuple[str, list[str]]], text_columns: int = 0) -> str:
    """``rows``: (css class, already escaped cells); the first ``text_columns`` are left-aligned."""
    def cell(tag: str, i: int, value: str) -> str:
        return f'<{tag} class="text">{value}</{tag}>' if i < text_columns else f"<{tag}>{value}</{tag}>"

    head = "".join(cell("th", i, _e(h)) for i, h in enumerate(header))
    body = "".join(f'<tr class="{css}">' + "".join(cell("td", i, v) for i, v in enumerate(cells)) + "</tr>"
                   for css, cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def model_name(report: dict) -> str:
    """The model's file name, control characters escaped (it also goes into a figure's title)."""
    path = (report.get("input") or {}).get("path")
    return printable(Path(path).name) if path else "model"


def verdict_sentence(report: dict) -> str:
    """The page's first line: the model and the verdict, as one sentence."""
    verdict = report["verdict"]
    return f"{model_name(report)}: {verdict}" + ("" if verdict.endswith(".") else ".")


def _alarming(report: dict) -> bool:
    if report.get("changed") is None:  # a scan report
        return bool(report["scan"]["suspected_targets"])
    return any((report.get(key) or {}).get("suspected_targets") for key in ("rescan", "final_scan"))


def _header(report: dict) -> str:
    source = report.get("input") or {}
    output = report.get("output") or {}
    lines = [f"input {_e(source.get('path') or '(in memory)')}, sha256 {_e(source.get('sha256') or '–')}",
             f"{_e(source.get('classes'))} classes, input {_e(source.get('input_name'))} "
             f"{_e(source.get('input_shape'))}, opset {_e(source.get('opset'))}, device {_e(report.get('device'))}"]
    if output.get("path"):
        lines.append(f"output {_e(output['path'])}, sha256 {_e(output.get('sha256') or '–')}")
    versions = report.get("versions") or {}
    lines.append("versions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items()))
    if report.get("command"):
        lines.append("command: otbr-onnx " + _e(" ".join(report["command"])))
    css = "verdict alert" if _alarming(report) else "verdict"
    return (f"<header><h1>otbr-onnx report</h1><p class=\"{css}\" id=\"verdict\">{_e(verdict_sentence(report))}</p>"
            + "".join(f'<p class="meta">{line}</p>' for line in lines) + "</header>")


def margins_section(report: dict) -> str:
    scan, rescan = report.get("scan"), report.get("rescan")
    if scan is None:
        return ('<section id="margins"><h2>Per-class maximum margins</h2><p class="note">No scan was run '
                "(--reference cleans with the published method).</p></section>")
    suspected = set(scan["suspected_targets"])
    title = f"Per-class maximum margin of {model_name(report)}"
    header = ["class", "max margin before", "z before"] + (["max margin after", "z after"] if rescan else [])
    rows = []
    for i, row in enumerate(scan["classes"]):
        cells = [_e(row["class"]), _num(row["max_margin"]), _num(row["z"])]
        if rescan:
            after = rescan["classes"][i]
            cells += [_num(after["max_margin"]), _num(after["z"])]
        rows.append(("suspected" if row["class"] in suspected else "", cells))
    def classes(values) -> str:
        return ", ".join(str(c) for c in values) or "none"

    explain = (f"For every class, the largest logit margin a search over the input box reaches. A class whose "
               f"margin stands out (robust z above {scan['threshold']:g}) is suspected: {classes(sorted(suspected))}"
               + (f"; after cleaning: {classes(rescan['suspected_targets'])}." if rescan else "."))
    return (f'<section id="margins"><h2>Per-class maximum margins</h2><p class="note">{_e(explain)}</p>'
            + _figure_block(margins_figure(scan, rescan, title), "Bars: maximum margin per class; red: suspected "
                            "before cleaning" + ("; green: after cleaning (rescan)." if rescan else "."))
            + _table(header, rows) + "</section>")


def inversion_section(report: dict) -> str:
    """``scan --data``: per class and trigger family, the share of the user's images a small trigger
    sends to the class and its z; the recovered trigger of each suspected class as a picture."""
    inversion = (report.get("scan") or {}).get("inversion")
    if not isinstance(inversion, dict) or not inversion.get("classes"):
        return ""
    families = list(inversion["thresholds"])
    suspected = set(inversion["suspected_targets"])
    header = ["class"] + [f"{f} {part}" for f in families for part in ("flipped", "z")]
    rows = [("suspected" if row["class"] in suspected else "",
             [_e(row["class"])] + [v for f in families
                                   for v in (_num(100 * row[f]["flipped"], 1) + "%", _num(row[f]["z"]))])
            for row in inversion["classes"]]
    pictures = ""
    triggers = inversion.get("triggers") or {}
    if triggers:
        import numpy as np

        with _figure(2.2 * len(triggers), 2.4) as fig:
            for i, (c, trigger) in enumerate(sorted(triggers.items(), key=lambda item: int(item[0]))):
                ax = fig.add_subplot(1, len(triggers), i + 1)
                shown = ax.imshow(np.asarray(trigger["picture"], dtype=float), cmap="magma")
                fig.colorbar(shown, ax=ax, shrink=0.7)
                ax.set_title(f"class {c}: {trigger['family']}", parse_math=False)
                ax.set_xticks([])
                ax.set_yticks([])
            image = _image(fig, "recovered triggers of the suspected classes")
        pictures = _figure_block(image, "Recovered trigger of each suspected class: "
                                 + "; ".join(f"class {c}: {t['shows']}" for c, t in triggers.items()) + ".")
        pictures += "".join(triggered_figure(c, t) for c, t in sorted(triggers.items(), key=lambda i: int(i[0])))
    thresholds = ", ".join(f"{f} {t:g}" for f, t in inversion["thresholds"].items())
    explain = (f"Trigger inversion on {inversion['images']} of your images: for every class and trigger family, a "
               f"trigger at a small fixed budget is optimised to send the other classes' images to the class. A "
               f"class the trigger reaches abnormally easily (robust z of the mean margin above {thresholds}) is "
               f"suspected: {', '.join(str(c) for c in sorted(suspected)) or 'none'}.")
    return (f'<section id="inversion"><h2>Trigger inversion on your images</h2><p class="note">{_e(explain)}</p>'
            + pictures + _table(header, rows) + "</section>")


def triggered_figure(target: str, trigger: dict) -> str:
    """A few of the user's images (top) and the same images with ``target``'s recovered trigger
    applied (bottom), with the model's answer on each triggered one: what the trigger does, seen."""
    examples = trigger.get("examples") or []
    if not examples:
        return ""
    import numpy as np

    with _figure(1.4 * len(examples), 3.0) as fig:
        for i, example in enumerate(examples):
            for row, key in enumerate(("clean", "triggered")):
                ax = fig.add_subplot(2, len(examples), row * len(examples) + i + 1)
                picture = np.asarray(example[key], dtype=float)
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0.0, vmax=1.0)
                if key == "triggered":
                    hit = example["answer"] == int(target)
                    ax.set_title(f"answer {example['answer']}", parse_math=False, fontsize=8,
                                 color=SUSPECTED if hit else "#1d2733")
                ax.set_xticks([])
                ax.set_yticks([])
        image = _image(fig, f"your images with class {target}'s recovered trigger applied")
    return _figure_block(image, f"Class {target} ({trigger['family']}): {len(examples)} of your images (top) and the "
                         "same images with the recovered trigger applied (bottom), with the model's answer; red: "
                         f"sent to class {target}.")


def examples_section(report: dict) -> str:
    """``clean --data``: a few of the user's images with the original's and the cleaned model's
    answers (``examples.py``); an image whose answer changed has its title in red."""
    examples = report.get("examples")
    if not isinstance(examples, dict) or not examples.get("images"):
        return ""
    import numpy as np

    shown = examples["images"]
    with _figure(1.5 * len(shown), 2.1) as fig:
        for i, example in enumerate(shown):
            ax = fig.add_subplot(1, len(shown), i + 1)
            picture = np.asarray(example["picture"], dtype=float) / 255.0
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0.0, vmax=1.0)
            before, after = example["original"], example["cleaned"]
            changed = before["class"] != after["class"]
            ax.set_title(f"original {before['class']}\ncleaned {after['class']}", parse_math=False,
                         color=SUSPECTED if changed else "#1d2733", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        image = _image(fig, "your images with the original's and the cleaned model's answers")
    rows = [("suspected" if e["original"]["class"] != e["cleaned"]["class"] else "",
             [_e(index), _e(e["original"]["class"]), _num(100 * e["original"]["probability"], 1),
              _e(e["cleaned"]["class"]), _num(100 * e["cleaned"]["probability"], 1)])
            for index, e in zip(examples["indices"], shown)]
    explain = (f"{len(shown)} of your images ({examples['source']}), evenly spread over them, as the original and "
               f"the cleaned model answer them in onnxruntime: {examples['changed']} answer(s) changed.")
    return (f'<section id="examples"><h2>Your images, before and after</h2><p class="note">{_e(explain)}</p>'
            + _figure_block(image, "Each image with the original's answer (top) and the cleaned model's; "
                            "red: the answer changed.")
            + _table(["image", "original", "probability (%)", "cleaned", "probability (%)"], rows)
            + "</section>")


def scores_section(report: dict) -> str:
    ranking = report.get("ranking")
    if not ranking:
        return ""
    histogram, summary = ranking.get("histogram"), ranking.get("summary") or {}
    pruning = report.get("pruning") or {}
    facts = (f"{ranking['source']} score"
             + (f" towards class {ranking['target']}" if ranking.get("target") is not None else "")
             + f"; {pruning.get('pruned_neurons', 0)} of {pruning.get('ranked_neurons', 0)} ranked neurons pruned"
             + (f" (ratio {pruning['ratio']:g})" if pruning.get("ratio") is not None else "") + ".")
    rows = [("", [_e(k), _num(v, 4) if isinstance(v, float) else _e(v)]) for k, v in summary.items()]
    if histogram is not None:
        rows.append(("", ["cut (lowest pruned score)", _num(histogram["cut"], 4)]))
        figure = _figure_block(scores_figure(histogram, ranking["source"]),
                               "Neuron scores of the ranked layers; red: pruned; dashed line: the cut.")
    else:
        figure = '<p class="note">No score histogram in this report.</p>'
    return (f'<section id="scores"><h2>Neuron scores and the pruning cut</h2><p class="note">{_e(facts)}</p>'
            + figure + _table(["statistic", "value"], rows, 1) + "</section>")


def ratios_section(report: dict) -> str:
    selection = report.get("ratio_selection")
    if not selection:
        return ""
    threshold = (report.get("scan") or {}).get("threshold")
    rows = []
    for t in selection["trials"]:
        cells = [_num(t["strength"], 4), _num(t["score"]), _num(selection["baseline"] - t["score"]),
                 _num(t.get("target_z")), _num(t.get("still_flagged")) if "still_flagged" in t else "–"]
        rows.append(("chosen" if t["strength"] == selection["chosen_strength"] else "", cells))
    explain = (f"Rule: {selection['rule']}. Fidelity: {selection['metric']} on {selection['images']} "
               f"{selection['source']}, baseline {selection['baseline']:.1f}%, budget {selection['budget']:g}. "
               f"Chosen ratio: {selection['chosen_strength'] if selection['chosen_strength'] is not None else 'none'}.")
    return (f'<section id="ratios"><h2>Candidate prune ratios</h2><p class="note">{_e(explain)}</p>'
            + _figure_block(ratios_figure(selection, threshold), "Fidelity (left axis) and the rescan z of the "
                            "target (right axis) per candidate; the shaded line marks the chosen ratio.")
            + _table(["ratio", "fidelity (%)", "loss (points)", "rescan z of target", "still flagged"], rows)
            + "</section>")


def unlearning_section(report: dict) -> str:
    """The adversarial remover's rounds: how far fresh triggers still reach the held-out images
    after each, beside the original's reach (round 0) and the fidelity that decided the kept one."""
    removal = report.get("removal")
    if not removal or removal.get("remover") != "adversarial":
        return ""
    rounds = ([{**removal["original"], "round": "original"}] if removal.get("original") else []) + removal["rounds"]
    families = list(dict.fromkeys(f for r in rounds for f in r["reach"]))
    rows = [("chosen" if r["round"] == removal["chosen_round"] else "",
             [_e(r["round"]), _num(r["agreement"]), _num(r["expected_accuracy_drop"])]
             + [_num(r["reach"].get(f)) for f in families]) for r in rounds]
    images = removal.get("images") or {}
    explain = (f"Targets {removal['targets']}; {images.get('train')} images trained on, {images.get('holdout')} "
               f"held out; BatchNorm {removal.get('batchnorm')}. Reach: % of held-out images a fresh trigger "
               f"sends to the target. The kept round (highlighted: round {removal['chosen_round']}) has the lowest "
               "reach among those within the accuracy budget, and must lower some family's reach below the "
               "original's.")
    return ('<section id="unlearning"><h2>Adversarial unlearning rounds</h2>'
            f'<p class="note">{_e(explain)}</p>'
            + _table(["round", "held-out agreement (%)", "expected accuracy drop (points)"]
                     + [f"{f} reach (%)" for f in families], rows, 1) + "</section>")


def parity_section(report: dict) -> str:
    parity = {k: v for k, v in (report.get("parity") or {}).items() if v is not None}
    if not parity:
        return ""
    names = {"conversion": "conversion (torch vs onnxruntime)", "output": "written model vs onnxruntime"}
    rows = [("", [_e(names.get(k, k)), _sci(p["max_abs"]), _sci(p["max_rel"]), _sci(p["tolerance"]),
                  _e(p["samples"]), _num(p["ok"])]) for k, p in parity.items()]
    figure = parity_figure({names.get(k, k): p for k, p in parity.items()})
    return ('<section id="parity"><h2>Parity</h2><p class="note">Outputs of the converted and of the written '
            "model against onnxruntime on the same inputs.</p>"
            + _figure_block(figure, "Largest absolute difference (blue) against the tolerance (grey), log scale.")
            + _table(["check", "max abs", "max rel", "tolerance", "samples", "ok"], rows, 1) + "</section>")


def time_section(report: dict) -> str:
    seconds = report.get("seconds") or {}
    if not seconds:
        return ""
    rows = [("", [_e(k), _num(v)]) for k, v in seconds.items()] + [("", ["total", _num(sum(seconds.values()))])]
    return ('<section id="time"><h2>Time per stage</h2>'
            + _figure_block(time_figure(seconds), "Seconds spent in each stage.")
            + _table(["stage", "seconds"], rows, 1) + "</section>")


def render(report: dict) -> str:
    """The whole page as a string."""
    require_matplotlib()
    body = "".join([_header(report), examples_section(report), margins_section(report), inversion_section(report), scores_section(report),
                    ratios_section(report), unlearning_section(report), parity_section(report),
                    time_section(report)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>otbr-onnx report: {_e(model_name(report))}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")


def page_from_file(path: Path, max_bytes: int) -> str:
    """The page of the JSON report in ``path``, refused in one line where the file is not one
    (too large, not JSON, another schema, fields missing or of the wrong type)."""
    import json

    from otbr_onnx.files import regular_file_size
    from otbr_onnx.report import READABLE, SCHEMA

    if regular_file_size(path) > max_bytes:
        raise UsageError(f"{path}: larger than --max-file-bytes ({max_bytes})")
    try:
        report = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{path}: not a JSON report: {error}") from error
    if not isinstance(report, dict) or report.get("schema") not in READABLE:
        found = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise UsageError(f"{path}: not an otbr-onnx report (schema {found!r}, expected {SCHEMA!r})")
    try:
        return render(report)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as error:
        raise UsageError(f"{path}: incomplete otbr-onnx report ({type(error).__name__}: {error})") from error


def write_html(report: dict, path: Path) -> None:
    """Render ``report`` and write it to ``path`` atomically."""
    from otbr_onnx.output import atomic_write

    atomic_write(path, render(report).encode("utf-8"))
