"""Fail when reStructuredText / Sphinx markup is left in the documentation.

The site renders docstrings with mkdocstrings as Markdown, where a Sphinx role
(:func:`x`), a `~module.Name` shortcut, a field list (:param x:), a `.. directive::`
or a `::` literal-block marker is not markup at all: it is printed as is, and the
code block after a `::` loses its highlighting. `mkdocs build --strict` does not
notice, so this script does, on two sources:

* the built site's HTML (what readers see), ignoring code blocks and inline code;
* every docstring of the package, public or private, read with `ast` (no import).

On the built site it also greps every file (pages, the search index, the sitemap), code
included, for names the project retired (`RETIRED`: the never-released request "lanes" and
their `LANE*` settings) and for the test marker `# Not runnable:` that rendered samples drop
(scripts/mkdocs_hooks.py). tests/test_packaging.py runs `find_retired` on the package's long
description.

Usage (`make docs` runs it after the build):

    python scripts/check_docs_markup.py [SITE_DIR ...]

Without SITE_DIR only the docstrings are checked. Exit status 1 and one line per
finding (`file:line: text`) if anything is found. tests/test_docs.py imports this
file to run the same checks on every test run.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "async_dbbridge"

# Each pattern: what it catches, and how it is written instead (for the message).
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # :func:`x`, :class:`~a.B`, :py:meth:`x` (the backtick may follow a code
    # span in HTML, where the role's argument became <code>).
    (
        re.compile(r"(?<![\w:]):(?:[a-z]+:)?[a-z]+:`"),
        "Sphinx role: write [`Name`][async_dbbridge.Name] or `name`",
    ),
    (re.compile(r"`~[A-Za-z_][\w.]*`"), "Sphinx `~module.Name` shortcut: write `Name`"),
    # A line that ends in "::" (but not ":::", mkdocstrings' own directive).
    (re.compile(r"(?<!:)::[ \t]*$"), "literal-block marker `::`: use a fenced ```python block"),
    (re.compile(r"^\s*\.\. [\w:-]+::"), "reST directive: use Markdown (a fenced block, a note)"),
    (
        re.compile(r"^\s*:(?:param|type|returns?|rtype|raises?|var|ivar|cvar)\b[^:\n]*:"),
        "reST field list: use Google-style Args:/Returns:/Raises: sections",
    ),
    (re.compile(r"`[^`\n]+ <[^>\n]+>`_"), "reST link: write [text](url)"),
)

#: Names of the first, never-released design, gone from the code: a reader who meets one in the
#: docs looks for something that does not exist.
RETIRED = re.compile(r"\b(?:lanes?|LANE_[A-Z_]+)\b", re.IGNORECASE)
#: tests/test_docs.py's marker for a sample it must not run; the site drops it.
TEST_MARKER = re.compile(r"#\s*Not runnable:")
_SITE_TEXT_SUFFIXES = frozenset({".html", ".json", ".xml", ".txt", ".js"})

_FENCE = re.compile(r"^\s*(```|~~~)")
# An inline code span not opened right after a role's colon.
_CODE_SPAN = re.compile(r"(?<!:)`[^`\n]+`")


class Finding(NamedTuple):
    where: str
    line: int
    text: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.problem}: {self.text!r}"


def _matches(text: str, where: str, line: int) -> list[Finding]:
    """One finding per pattern that matches `text`, quoting the match in context."""
    findings = []
    # A code span's *closing* backtick may follow a colon-word that is no role
    # (`pip download --no-binary :all:`): a role's backtick opens its span, so the
    # role pattern looks at the text with every other code span removed.
    without_spans = _CODE_SPAN.sub("``", text)
    for pattern, problem in PATTERNS:
        match = pattern.search(without_spans if pattern is PATTERNS[0][0] else text)
        if match is not None:
            start, end = max(0, match.start() - 40), match.end() + 40
            quote = ("..." if start else "") + text[start:end].strip()
            quote += "..." if end < len(text) else ""
            findings.append(Finding(where, line, quote, problem))
    return findings


def find_markup(text: str, where: str, first_line: int = 1) -> list[Finding]:
    """reST markup in Markdown `text` (a docstring), outside fenced code blocks."""
    findings: list[Finding] = []
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=first_line):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            findings += _matches(line, where, number)
    return findings


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[str, ast.Constant]]:
    nodes: list[tuple[str, ast.AST]] = [("<module>", tree)]
    nodes += [
        (node.name, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    for name, node in nodes:
        body = getattr(node, "body", [])
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            yield name, body[0].value


def scan_docstrings(package: Path = PACKAGE) -> list[Finding]:
    """Every docstring of every module under `package`, with its line numbers."""
    findings: list[Finding] = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for _name, constant in _docstring_nodes(tree):
            where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            findings += find_markup(str(constant.value), where, constant.lineno)
    return findings


_BLOCK_TAGS = frozenset(
    {"p", "li", "dd", "dt", "td", "th", "tr", "div", "section", "table", "blockquote", "br"}
    | {"h1", "h2", "h3", "h4", "h5", "h6", "summary"}
)
_SKIPPED_TAGS = frozenset({"script", "style", "pre", "svg", "template"})


class _TextOfPage(HTMLParser):
    """A page's text, one block element per line, inline code kept as `code`.

    Code blocks (`<pre>`) are left out: a `::` or a role there is code. Inline
    `<code>` is kept in backticks, because a role the Markdown left raw comes out
    as ":func:" followed by the `<code>` that was its argument.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.lines: list[int] = []  # source line of each part, for the message
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping += 1
        elif not self._skipping:
            self._add("\n" if tag in _BLOCK_TAGS else "`" if tag == "code" else "")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
            self._add("\n")
        elif not self._skipping:
            self._add("\n" if tag in _BLOCK_TAGS else "`" if tag == "code" else "")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._add(data.replace("\n", " "))

    def _add(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.lines.append(self.getpos()[0])


def scan_html(path: Path, where: str | None = None) -> list[Finding]:
    """reST markup in the text readers see on one built page."""
    parser = _TextOfPage()
    parser.feed(path.read_text())
    parser.close()
    findings: list[Finding] = []
    line: list[str] = []
    source_line = 1
    for part, part_line in [*zip(parser.parts, parser.lines, strict=True), ("\n", 0)]:
        if part == "\n":
            findings += _matches("".join(line), where or str(path), source_line)
            line = []
            continue
        if not line:
            source_line = part_line
        line.append(part)
    return findings


def find_retired(text: str, where: str) -> list[Finding]:
    """Retired names and test markers anywhere in `text`, code included."""
    findings = []
    for number, line in enumerate(text.splitlines(), start=1):
        for pattern, problem in (
            (RETIRED, "retired name (request lanes were never released)"),
            (TEST_MARKER, "test marker in a rendered sample (scripts/mkdocs_hooks.py drops it)"),
        ):
            for match in pattern.finditer(line):
                start = max(0, match.start() - 40)
                findings.append(Finding(where, number, line[start : match.end() + 40], problem))
    return findings


def scan_site(site: Path) -> list[Finding]:
    """Every HTML page of a built site; every text file of it for retired names."""
    if not (site / "index.html").is_file():
        raise SystemExit(f"check_docs_markup: {site} is not a built site (no index.html)")
    findings = [finding for page in sorted(site.rglob("*.html")) for finding in scan_html(page)]
    for path in sorted(site.rglob("*")):
        if path.suffix in _SITE_TEXT_SUFFIXES and not path.name.endswith(".min.js"):
            findings += find_retired(path.read_text(errors="replace"), str(path))
    return findings


def main(argv: Iterable[str]) -> int:
    findings = scan_docstrings()
    for site in argv:
        findings += scan_site(Path(site))
    for finding in findings:
        print(finding)
    if findings:
        print(
            f"check_docs_markup: {len(findings)} piece(s) of reST/Sphinx markup; the docs are "
            "Markdown (mkdocstrings, Google style)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
