"""The outputs where people look (issue 14): SARIF 2.1.0 for code scanning and the HTML report.

Every SARIF log a test produces is validated against the official SARIF 2.1.0 JSON schema,
vendored as ``tests/sarif-schema-2.1.0.json``: the OASIS errata01 schema, copied unchanged from
github.com/oasis-tcs/sarif-spec, ``sarif-2.1/schema/sarif-schema-2.1.0.json`` (commit a560296c).
The HTML page is parsed and its numbers checked against the JSON report, and opened in a real
headless Chromium (``tests/browser.py``) where Debian's ``chromium`` is installed.

One backdoored MLP is cleaned once through the CLI (module fixture) and its report, SARIF log
and page are shared by the tests; a hostile copy whose names carry HTML, quotes and terminal
escapes checks that SARIF carries them as data and that the page escapes them.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from otbr_onnx.cli import main
from otbr_onnx.errors import EXIT_SUSPECTED, ParityError
from tests import builders
from tests.conftest import FAST_ARGS

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("matplotlib")


SARIF_SCHEMA = json.loads((Path(__file__).parent / "sarif-schema-2.1.0.json").read_text())
REPORT_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "report.schema.json").read_text())
# Small but real searches: the tiny MLP's backdoor target stands out with these (tests/test_scan.py).
QUICK = ["--scan-starts", "4", "--scan-steps", "50", "--probes", "16"]
TARGET = 2
HOSTILE = '<script>alert(1)</script>"\x1b[31m$x$'
# the graph's names: load.py refuses quotes, backslashes and control characters in names (they
# reach generated PyTorch code; test_a_refused_model... covers them), so markup alone here
HOSTILE_NAME = "<script>alert(1)</script><b>$x$"
HOSTILE_FILE = 'bd<img src=x onerror=alert(1)>"\x1b[31m$.onnx'  # a file name has no "/"


def sarif_valid(text: str) -> dict:
    """The parsed log, after checking it against the SARIF 2.1.0 schema (a draft-04 schema)."""
    log = json.loads(text)
    jsonschema.Draft4Validator(SARIF_SCHEMA).validate(log)
    return log


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def hostile_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node, tensor, input and output name hostile, and its metadata."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    names = {v.name for v in [*graph.input, *graph.output, *graph.initializer]}
    names |= {n for node in graph.node for n in [*node.input, *node.output] if n}
    renamed = {name: f"{name}{HOSTILE_NAME}" for name in names}
    for value in [*graph.input, *graph.output, *graph.initializer, *graph.value_info]:
        value.name = renamed.get(value.name, value.name)
    for i, node in enumerate(graph.node):
        node.name = f"node{i}{HOSTILE_NAME}"
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    onnx.helper.set_model_props(model, {"author": HOSTILE, "description": HOSTILE})
    model.producer_name = HOSTILE
    return model


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """The backdoored MLP cleaned through the CLI, from its own folder (relative paths, as in CI)."""
    folder = tmp_path_factory.mktemp("cleaned")
    _, model = builders.build_backdoored(TARGET)
    (folder / "bd.onnx").write_bytes(model.SerializeToString())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = invoke(["clean", "bd.onnx", "out.onnx", "--report", "r.json", "--sarif", "r.sarif",
                         "--html", "r.html", *QUICK])
    # the MLP's scan flags class 2 and class 6; class 2 is removed, a fresh scan of the written
    # model still flags 6: written, and exit 6 as `scan` of that file would
    assert result.exit_code == EXIT_SUSPECTED and "flags class 6" in result.output, result.output
    return folder, result, json.loads((folder / "r.json").read_text())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A hostile copy of the backdoored MLP under a hostile file name, cleaned through the CLI."""
    folder = tmp_path_factory.mktemp("hostile")
    _, model = builders.build_backdoored(TARGET)
    path = folder / HOSTILE_FILE
    path.write_bytes(hostile_copy(model).SerializeToString())
    result = invoke(["clean", path, folder / "out.onnx", "--report", folder / "r.json", "--format", "sarif",
                     "--html", folder / "r.html", *QUICK])
    assert result.exit_code == EXIT_SUSPECTED, result.output  # as the `cleaned` fixture: class 6 stays flagged
    return folder, result, json.loads((folder / "r.json").read_text())


# --- SARIF ----------------------------------------------------------------------------------------------


def test_clean_sarif_file_is_valid_and_names_the_finding_and_the_files(cleaned):
    folder, result, report = cleaned
    log = sarif_valid((folder / "r.sarif").read_text())
    run = log["runs"][0]
    assert log["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "otbr-onnx"
    first = run["results"][0]
    rules = run["tool"]["driver"]["rules"]
    assert first["ruleId"] == "OTBR002" == rules[first["ruleIndex"]]["id"] and first["level"] == "warning"
    assert first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "bd.onnx"
    assert first["relatedLocations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "out.onnx"
    assert first["message"]["text"] == f"bd.onnx: {report['verdict']}"
    assert first["properties"]["suspectedTargets"][0] == TARGET
    assert first["partialFingerprints"]["modelSha256/v1"] == report["input"]["sha256"]
    # the fresh scan of the written model: a class still flagged is its own finding, at the output
    # file, and the exit code is 6
    still = report["final_scan"]["suspected_targets"]
    assert still == [6] and [r["ruleId"] for r in run["results"][1:]] == ["OTBR001"]
    invocation = run["invocations"][0]
    assert invocation["exitCode"] == EXIT_SUSPECTED and invocation["executionSuccessful"] is True
    assert invocation["commandLine"].startswith("otbr-onnx clean bd.onnx out.onnx --report r.json")
    # --sarif FILE keeps the terminal as it was: nothing on stdout, the summary on stderr
    assert result.stdout == "" and "otbr-onnx: backdoor suspected" in result.stderr


def test_scan_sarif_on_stdout_is_written_before_exit_6(cleaned, tmp_path):
    folder, _, _ = cleaned
    result = invoke(["scan", folder / "bd.onnx", "--format", "sarif", *QUICK[:4]])
    assert result.exit_code == 6, result.output
    run = sarif_valid(result.stdout)["runs"][0]
    assert [(r["ruleId"], r["level"]) for r in run["results"]] == [("OTBR001", "error")]
    assert run["results"][0]["properties"]["suspectedTargets"][0] == TARGET
    uri = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == (folder / "bd.onnx").as_uri()  # an absolute path becomes a file:// URI
    assert run["invocations"][0]["exitCode"] == 6 and run["invocations"][0]["executionSuccessful"] is True


def test_json_is_still_the_report_and_contradicting_formats_are_refused(cleaned, tmp_path):
    folder, _, _ = cleaned
    result = invoke(["scan", folder / "bd.onnx", "--json", *QUICK[:4]])
    assert result.exit_code == 6 and json.loads(result.stdout)["schema"] == "otbr-onnx/report/3"
    refused = invoke(["scan", folder / "bd.onnx", "--json", "--format", "sarif"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "--format sarif" in refused.stderr


def test_a_refused_model_gets_its_sarif_before_exit_3(tmp_path):
    _, model = builders.build_backdoored(TARGET, steps=10)
    model.graph.node[-1].domain = f"com.evil{HOSTILE}"  # an operator from an unknown domain: refused
    model.opset_import.append(onnx.helper.make_opsetid(model.graph.node[-1].domain, 1))
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    result = invoke(["clean", path, tmp_path / "out.onnx", "--sarif", tmp_path / "r.sarif", *FAST_ARGS])
    assert result.exit_code == 3, result.output
    text = (tmp_path / "r.sarif").read_text()
    run = sarif_valid(text)["runs"][0]
    assert [(r["ruleId"], r["level"]) for r in run["results"]] == [("OTBR003", "error")]
    message = run["results"][0]["message"]["text"]
    # the domain as data: the HTML and the quote raw (JSON escapes the quote), the terminal escape as
    # the refusal's message writes it for every output (a visible \x1b)
    assert '<script>alert(1)</script>"\\x1b[31m$x$' in message and "\x1b" not in text
    assert run["invocations"][0]["exitCode"] == 3 and run["invocations"][0]["executionSuccessful"] is True
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("error, code, rule, successful", [
    (ParityError("written model differs from the cleaned network (max abs 1.0)"), 4, "OTBR004", True),
    (RuntimeError("a bug (max abs 1.0)"), 1, "OTBR007", False),  # an internal error: the check did not finish
])
def test_a_failure_after_the_model_is_cleaned_gets_its_sarif_before_the_exit(error, code, rule, successful,
                                                                             tmp_path, monkeypatch):
    _, model = builders.build("chain")
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())

    def failing_emit(prepared, weights):
        raise error

    monkeypatch.setattr("otbr_onnx.pipeline.emit", failing_emit)
    result = invoke(["clean", path, tmp_path / "out.onnx", "--format", "sarif", *FAST_ARGS, "--prune-ratio", "0.2"])
    assert result.exit_code == code
    run = sarif_valid(result.stdout)["runs"][0]
    assert [(r["ruleId"], r["level"]) for r in run["results"]] == [(rule, "error")]
    assert "max abs 1.0" in run["results"][0]["message"]["text"]
    assert run["invocations"][0]["exitCode"] == code and run["invocations"][0]["executionSuccessful"] is successful
    assert not (tmp_path / "out.onnx").exists()


def test_batch_sarif_has_one_result_per_model_and_the_worst_exit_code(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    _, model = builders.build("chain")
    (folder / "good.onnx").write_bytes(model.SerializeToString())
    (folder / "broken.onnx").write_bytes(b"not an onnx model")
    result = invoke(["clean", folder, out, "--sarif", tmp_path / "b.sarif", "--quiet", *FAST_ARGS,
                     "--prune-ratio", "0.2"])
    assert result.exit_code == 2, result.output
    run = sarif_valid((tmp_path / "b.sarif").read_text())["runs"][0]
    by_model = {Path(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]).name: r
                for r in run["results"]}
    assert set(by_model) == {"good.onnx", "broken.onnx"}
    assert by_model["good.onnx"]["ruleId"] == "OTBR006"  # --always on a model nothing was suspected in
    assert by_model["good.onnx"]["properties"]["batchStatus"] == "cleaned"
    assert (by_model["broken.onnx"]["ruleId"], by_model["broken.onnx"]["level"]) == ("OTBR007", "error")
    invocation = run["invocations"][0]
    assert invocation["exitCode"] == 2 and invocation["executionSuccessful"] is False
    # a rerun skips the finished model and still reports it, from its written report
    again = invoke(["clean", folder, out, "--format", "sarif", "--quiet", *FAST_ARGS, "--prune-ratio", "0.2"])
    rerun = {Path(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]).name: r
             for r in sarif_valid(again.stdout)["runs"][0]["results"]}
    assert rerun["good.onnx"]["properties"]["batchStatus"] == "skipped"
    assert rerun["good.onnx"]["ruleId"] == "OTBR006"


def test_batch_scan_sarif_comes_from_the_reports_and_needs_an_out_dir(cleaned, tmp_path):
    folder, _, _ = cleaned
    batch = tmp_path / "in"
    batch.mkdir()
    (batch / "bd.onnx").write_bytes((folder / "bd.onnx").read_bytes())
    _, model = builders.build("chain")
    (batch / "plain.onnx").write_bytes(model.SerializeToString())
    refused = invoke(["scan", batch, "--sarif", tmp_path / "s.sarif", *QUICK[:4]])
    assert refused.exit_code == 2 and "--out-dir" in refused.output
    assert not (tmp_path / "s.sarif").exists()
    result = invoke(["scan", batch, "--out-dir", tmp_path / "out", "--format", "sarif", "--quiet", *QUICK[:4],
                     "--scan-threshold", "1e9"])
    assert result.exit_code == 0, result.output
    rules = {Path(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]).name: r["ruleId"]
             for r in sarif_valid(result.stdout)["runs"][0]["results"]}
    assert rules == {"bd.onnx": "OTBR005", "plain.onnx": "OTBR005"}  # nothing can pass a threshold of 1e9
    flagged = invoke(["scan", batch / "bd.onnx", batch / "plain.onnx", "--out-dir", tmp_path / "out2",
                      "--format", "sarif", "--quiet", *QUICK[:4]])
    assert flagged.exit_code == 6, flagged.output
    run = sarif_valid(flagged.stdout)["runs"][0]
    rules = {Path(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]).name: r for r in run["results"]}
    assert rules["bd.onnx"]["ruleId"] == "OTBR001"
    assert rules["bd.onnx"]["properties"]["suspectedTargets"][0] == TARGET
    # a random tiny model may or may not stand out: its rule follows its own written report
    plain = json.loads((tmp_path / "out2" / "plain.report.json").read_text())
    suspected = bool(plain["scan"]["suspected_targets"])
    assert rules["plain.onnx"]["ruleId"] == ("OTBR001" if suspected else "OTBR005")
    assert run["invocations"][0]["exitCode"] == 6


def test_hostile_names_are_carried_as_data_in_sarif(hostile):
    folder, result, report = hostile
    assert "\x1b" not in result.stdout  # json.dumps writes it as \u001b
    run = sarif_valid(result.stdout)["runs"][0]
    first = run["results"][0]
    assert first["message"]["text"] == f"{folder / HOSTILE_FILE}: {report['verdict']}"
    uri = first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == (folder / HOSTILE_FILE).as_uri() and not re.search(r'[<>"\x1b]', uri)


def test_each_kind_of_clean_report_maps_to_its_rule(cleaned):
    from otbr_onnx import sarif

    _, _, report = cleaned
    unchanged = {k: v for k, v in report.items() if k not in ("ranking", "pruning", "layers")}
    final = report["final_scan"]
    cases = {"OTBR005": {**unchanged, "changed": False, "rescan": None, "final_scan": None},
             "OTBR006": {**report, "scan": None, "rescan": None, "final_scan": None},
             "OTBR002": {**report, "final_scan": {**final, "suspected_targets": []}}}
    for rule, case in cases.items():
        found = sarif.clean_results(case)
        assert [r["ruleId"] for r in found] == [rule], rule
        sarif_valid(json.dumps(sarif.log(found, ["clean"], 0)))
    still = sarif.clean_results({**report, "final_scan": {**final, "suspected_targets": [TARGET]}})
    assert [r["ruleId"] for r in still] == ["OTBR002", "OTBR001"]
    # a report from before the final scan existed: the remover's rescan stands in for it
    older = {k: v for k, v in report.items() if k != "final_scan"}
    assert [r["ruleId"] for r in sarif.clean_results({**older, "rescan": {**report["rescan"], "suspected_targets": []}})
            ] == ["OTBR002"]
    assert still[1]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "out.onnx"


def test_the_docs_document_every_rule():
    from otbr_onnx.sarif import RULES

    page = (Path(__file__).resolve().parents[1] / "docs" / "ci.md").read_text()
    rows = re.findall(r"^\| (OTBR\d{3}) \| ([a-z-]+) \| (error|warning|note) \|", page, re.M)
    assert rows == [(r.id, r.name, r.level) for r in RULES]


# --- the report's ranking histogram -------------------------------------------------------------------


def test_the_report_carries_the_score_histogram_and_the_cut(cleaned):
    _, _, report = cleaned
    jsonschema.validate(report, REPORT_SCHEMA)
    histogram = report["ranking"]["histogram"]
    assert len(histogram["edges"]) == len(histogram["kept"]) + 1 == len(histogram["pruned"]) + 1
    assert sum(histogram["kept"]) + sum(histogram["pruned"]) == report["pruning"]["ranked_neurons"]
    assert sum(histogram["pruned"]) == report["pruning"]["pruned_neurons"] > 0
    first_pruned_bin = next(i for i, n in enumerate(histogram["pruned"]) if n)
    assert histogram["edges"][first_pruned_bin] <= histogram["cut"] <= histogram["edges"][first_pruned_bin + 1]


# --- HTML -------------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """The parts of the page the tests check: the verdict, tables by section, images, any script."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.section, self.in_cell, self.in_verdict = None, False, False
        self.verdict, self.tables, self.images, self.tags = "", {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.section = attrs.get("id")
        elif tag == "tr":
            self.tables.setdefault(self.section, []).append([])
        elif tag in ("td", "th"):
            self.in_cell = True
            self.tables[self.section][-1].append("")
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "p" and attrs.get("id") == "verdict":
            self.in_verdict = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_cell = False
        elif tag == "p":
            self.in_verdict = False

    def handle_data(self, data):
        if self.in_cell:
            self.tables[self.section][-1][-1] += data
        if self.in_verdict:
            self.verdict += data


def svgs(page: Page) -> list[ET.Element]:
    """Each figure's SVG, decoded from its data URI and parsed as XML (so it is well-formed)."""
    prefix = "data:image/svg+xml;base64,"
    assert all(img["src"].startswith(prefix) for img in page.images)
    return [ET.fromstring(base64.b64decode(img["src"][len(prefix):])) for img in page.images]


def test_the_page_shows_the_reports_verdict_and_numbers(cleaned):
    folder, _, report = cleaned
    page = Page((folder / "r.html").read_text())
    assert page.verdict == f"bd.onnx: {report['verdict']}" + ("" if report["verdict"].endswith(".") else ".")
    assert len(page.images) == 5 and len(svgs(page)) == 5  # margins, scores, ratios, parity, time
    margins = page.tables["margins"]
    assert margins[0] == ["class", "max margin before", "z before", "max margin after", "z after"]
    for row, before, after in zip(margins[1:], report["scan"]["classes"], report["rescan"]["classes"]):
        assert row == [str(before["class"]), f"{before['max_margin']:.2f}", f"{before['z']:.2f}",
                       f"{after['max_margin']:.2f}", f"{after['z']:.2f}"]
    suspected = [t for t in page.tags if t[0] == "tr" and t[1].get("class") == "suspected"]
    assert len(suspected) == len(report["scan"]["suspected_targets"]) >= 1
    selection = report["ratio_selection"]
    trials = page.tables["ratios"][1:]
    assert [row[:2] for row in trials] == [[f"{t['ratio']:.4f}", f"{t['score']:.2f}"] for t in selection["trials"]]
    chosen = [t for t in page.tags if t[0] == "tr" and t[1].get("class") == "chosen"]
    assert len(chosen) == 1 and selection["chosen_ratio"] is not None
    parity = page.tables["parity"]
    assert parity[2][1] == f"{report['parity']['output']['max_abs']:.2e}" and parity[2][5] == "yes"
    times = {row[0]: row[1] for row in page.tables["time"][1:]}
    assert times == {**{k: f"{v:.2f}" for k, v in report["seconds"].items()},
                     "total": f"{sum(report['seconds'].values()):.2f}"}
    scores = dict(page.tables["scores"][1:])
    assert scores["cut (lowest pruned score)"] == f"{report['ranking']['histogram']['cut']:.4f}"


def test_the_page_is_self_contained(cleaned):
    folder, _, _ = cleaned
    text = (folder / "r.html").read_text()
    page = Page(text)
    assert not [t for t in page.tags if t[0] in ("script", "link", "iframe", "object", "embed")]
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", text, re.I)
    for svg in svgs(page):  # the figures reach nothing outside either
        assert not [e for e in svg.iter() if e.get("{http://www.w3.org/1999/xlink}href", "#").startswith(("http", "/"))]


def test_the_page_adapts_to_an_unchanged_model_and_to_a_clean_without_scan(cleaned):
    from otbr_onnx.html_report import render

    _, _, report = cleaned
    unchanged = {**{k: v for k, v in report.items() if k not in ("ranking", "pruning", "layers", "ratio_selection")},
                 "changed": False, "rescan": None, "parity": {**report["parity"], "output": None}}
    page = Page(render(unchanged))
    assert len(svgs(page)) == 3 and set(page.tables) == {"margins", "parity", "time"}  # no ranking, no ratios
    assert page.tables["margins"][0] == ["class", "max margin before", "z before"] and len(page.tables["parity"]) == 2
    published = Page(render({**report, "scan": None, "rescan": None}))
    assert len(svgs(published)) == 4 and "No scan was run" in render({**report, "scan": None, "rescan": None})


def test_report_command_renders_the_same_page_from_the_json(cleaned, tmp_path):
    folder, _, _ = cleaned
    result = invoke(["report", folder / "r.json", "-o", tmp_path / "again.html"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.html").read_text() == (folder / "r.html").read_text()  # deterministic figures


def test_report_command_renders_a_version_2_report(cleaned, tmp_path):
    """Version 3 only grouped the options, which the page does not show: a version-2 report (flat
    options) renders as before."""
    folder, _, _ = cleaned
    report = json.loads((folder / "r.json").read_text())
    flat = {name: value for group in report["options"].values() for name, value in group.items()}
    (tmp_path / "v2.json").write_text(json.dumps({**report, "schema": "otbr-onnx/report/2", "options": flat}))
    result = invoke(["report", tmp_path / "v2.json", "-o", tmp_path / "v2.html"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v2.html").read_text() == (folder / "r.html").read_text()


def test_report_command_refuses_what_is_not_a_report_in_one_line(cleaned, tmp_path):
    folder, _, _ = cleaned
    for name, content in [("model.json", (folder / "bd.onnx").read_bytes()), ("other.json", b'{"schema": "x"}'),
                          ("partial.json", b'{"schema": "otbr-onnx/report/2", "verdict": "ok"}')]:
        (tmp_path / name).write_bytes(content)
        result = invoke(["report", tmp_path / name, "-o", tmp_path / "x.html"])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, (name, result.output)
        assert result.stderr.startswith("otbr-onnx: error: ") and not (tmp_path / "x.html").exists()


def test_scan_html_shows_the_margins_and_the_time(cleaned, tmp_path):
    folder, _, _ = cleaned
    result = invoke(["scan", folder / "bd.onnx", "--html", tmp_path / "s.html", "--quiet", *QUICK[:4]])
    assert result.exit_code == 6, result.output
    page = Page((tmp_path / "s.html").read_text())
    assert page.verdict.startswith("bd.onnx: backdoor suspected: target class 2")
    assert len(svgs(page)) == 2 and set(page.tables) == {"margins", "time"}


def test_html_without_matplotlib_fails_first_naming_the_extra(cleaned, tmp_path, monkeypatch):
    folder, _, _ = cleaned
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now fails
    result = invoke(["clean", folder / "bd.onnx", tmp_path / "o.onnx", "--html", tmp_path / "r.html", *FAST_ARGS])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "otbr-onnx[html]" in result.stderr and not (tmp_path / "o.onnx").exists()


def test_hostile_names_are_escaped_in_the_page_and_its_figures(hostile):
    folder, _, report = hostile
    text = (folder / "r.html").read_text()
    assert HOSTILE_FILE in report["input"]["path"] and HOSTILE_NAME in report["layers"][0]["node"]
    page = Page(text)
    assert not [t for t in page.tags if t[0] == "script" or any(k.startswith("on") for k in t[1])]
    assert "<script" not in text.lower() and "<img src=x" not in text and "\x1b" not in text
    assert "bd&lt;img src=x onerror=alert(1)&gt;&quot;\\x1b[31m$.onnx" in text  # shown, escaped
    assert "input&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;$x$" in text  # the graph input's name
    assert page.verdict.startswith('bd<img src=x onerror=alert(1)>"\\x1b[31m$.onnx: ')  # as text
    titles = [e.text for svg in svgs(page) for e in svg.iter() if e.text and "onerror" in e.text]
    assert titles and all("<img" in t for t in titles)  # the title survives as text in the SVG ...
    for svg in svgs(page):  # ... and never as markup
        assert not [e for e in svg.iter() if e.tag.split("}")[-1] in ("script", "img", "foreignObject")]


# --- in a real browser ----------------------------------------------------------------------------------


needs_chromium = pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(),
    reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")


@needs_chromium
def test_the_browser_check_sees_a_console_error_and_a_broken_image(tmp_path):
    from tests.browser import check_page

    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>t</title></head><body><p>x</p>'
                    '<img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    check = check_page(page)
    assert any("boom" in e for e in check.errors)
    assert check.images == [{"complete": True, "naturalWidth": 0, "naturalHeight": 0}]


@needs_chromium
@pytest.mark.parametrize("which", ["cleaned", "hostile"])
def test_the_page_renders_in_chromium_without_errors(which, request, tmp_path):
    from PIL import Image

    from tests.browser import check_page

    folder, _, _ = request.getfixturevalue(which)
    check = check_page(folder / "r.html")
    (tmp_path / "page.png").write_bytes(check.screenshot)
    assert check.errors == []
    assert len(check.images) == 5 and all(i["complete"] and i["naturalWidth"] > 0 for i in check.images)
    assert check.title.startswith("otbr-onnx report: ")
    assert "Per-class maximum margins" in check.text and "Candidate prune ratios" in check.text
    if which == "hostile":
        assert "\\x1b[31m" in check.text  # the escape is shown, not executed
    image = np.asarray(Image.open(BytesIO(check.screenshot)).convert("RGB"))
    assert image.shape[1] == 1200 and image.shape[0] > 1500  # the whole page, not one screen
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert image.std() > 10 and colours > 50  # text, bars and highlights, not a blank page


def test_the_html_verdict_is_an_alert_when_the_final_scan_flags_a_class():
    """A written model whose fresh scan still flags a class (exit 6) is shown as an alert, as one
    whose rescan does; a clean report with neither is not."""
    from otbr_onnx.html_report import _alarming
    quiet = {"changed": True, "rescan": {"suspected_targets": []}, "final_scan": {"suspected_targets": []}}
    assert not _alarming(quiet)
    assert _alarming({**quiet, "final_scan": {"suspected_targets": [4]}})
    assert _alarming({**quiet, "rescan": {"suspected_targets": [0]}, "final_scan": None})
