"""The documentation keeps up with the code: every command-line option is documented in
docs/cli.md, and every relative link in README.md and docs/ leads to a file (and a heading) that
exists. Read from the files and the click command tree; nothing is run."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_PAGE = ROOT / "docs" / "cli.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- reading markdown -----------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"(?<!\!)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?\s*\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: a link inside a code sample is not a link."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def code_spans(text: str) -> list[str]:
    """Every inline code span's content, outside fenced blocks."""
    return [match.group(2).strip() for line in prose_lines(text) for match in CODE_SPAN.finditer(line)]


def links(text: str) -> list[str]:
    """The targets of inline links and images in prose (code spans removed first)."""
    found = []
    for line in prose_lines(text):
        line = CODE_SPAN.sub("", line)
        found += [m.group(1) for m in LINK.finditer(line)] + [m.group(1) for m in IMAGE.finditer(line)]
    return found


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: the text without markup, lower case, punctuation
    dropped (letters, digits, spaces, hyphens and underscores kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` that lead nowhere: a missing file, or a missing heading."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = page if not path else (page.parent / path).resolve()
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


# --- reading the command tree ---------------------------------------------------------------------


def long_options(group: click.Group) -> dict[str, set[str]]:
    """Per command (``scan``, ``clean`` ...; ``""`` for the group itself), its ``--long`` options."""
    found = {"": {o for p in group.params for o in p.opts + p.secondary_opts if o.startswith("--")}}
    for name, command in group.commands.items():
        found[name] = {o for p in command.params if isinstance(p, click.Option)
                       for o in p.opts + p.secondary_opts if o.startswith("--")}
    return found


def undocumented(options: dict[str, set[str]], page_text: str) -> list[str]:
    """``command --option`` for every option that no code span of the page starts with (as the
    whole span, or followed by a space or ``=`` and its value): ``--data-mean`` does not document
    ``--data``."""
    spans = code_spans(page_text)
    documented = {re.split(r"[ =]", span, maxsplit=1)[0] for span in spans}
    documented |= {word for span in spans for word in span.split() if word.startswith("--")}
    return sorted(f"{command} {option}".strip() for command, opts in options.items() for option in opts
                  if option not in documented)


# --- the checks -----------------------------------------------------------------------------------


def test_every_option_of_every_command_is_in_the_cli_page():
    from otbr_onnx.cli import main

    options = long_options(main)
    assert {"scan", "clean", "eval", "inspect", "report", "verify"} <= set(options)
    missing = undocumented(options, CLI_PAGE.read_text(encoding="utf-8"))
    assert not missing, f"options missing from docs/cli.md: {', '.join(missing)}"


def test_every_command_has_its_section_in_the_cli_page():
    from otbr_onnx.cli import main

    headings = anchors(CLI_PAGE.read_text(encoding="utf-8"))
    missing = [name for name in main.commands if f"otbr-onnx-{name}" not in headings]
    assert not missing, f"no '## otbr-onnx NAME' section in docs/cli.md for: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert not broken_links(page), "\n".join(broken_links(page))


def test_the_readme_is_a_front_page():
    """The reference lives in docs/; the README stays short enough to read in five minutes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert {f"docs/{name}" for name in ("cli.md", "data.md", "ci.md", "threat-model.md", "method.md")} <= set(
        links(readme))


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert ci in [line for block in blocks for line in block.splitlines()]


# --- the checks can fail --------------------------------------------------------------------------


def test_a_missing_option_is_reported():
    @click.group()
    def group():
        pass

    @group.command()
    @click.option("--documented")
    @click.option("--data")
    @click.option("--forgotten/--no-forgotten")
    def command(documented, data, forgotten):
        pass

    page = "Use `--documented VALUE` or `--data-mean M`.\n```\n--forgotten in a code block\n```\n`--no-forgotten`"
    assert undocumented(long_options(group), page) == ["command --data", "command --forgotten"]


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# A title\n\n## Exit codes (`--quiet`)\n\n## Exit codes (`--quiet`)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-title) [ok](other.md#exit-codes---quiet-1) [ok](#here) [web](https://x.y/z)\n"
        "# Here\n"
        "[gone](missing.md) [no heading](other.md#nothing) ![pic](missing.png) `[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n")
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#nothing: no heading #nothing in other.md",
        f"missing.png: no file {tmp_path / 'missing.png'}",
    ]


def test_slugs_are_githubs():
    assert slug("Memory (`--max-memory`)") == "memory---max-memory"
    assert slug("An `.npz` file") == "an-npz-file"
    assert slug("otbr-onnx scan") == "otbr-onnx-scan"
    assert slug("Is it gone? The rescan is a proxy") == "is-it-gone-the-rescan-is-a-proxy"
