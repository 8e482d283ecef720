"""The house rules that a reader relies on: cited doc sections exist, imports follow the layers."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

DOC = re.compile(r"docs/([\w-]+)\.md")
# The docs also name each other without docs/ ("cluster.md §4"), and the shared design as DESIGN.
DOC_IN_DOCS = re.compile(r"([\w-]+)\.md|\b(DESIGN)\b")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
RFC = re.compile(r"RFC\s*\d+\s*$")           # "RFC 2046 §5.1.5" cites the RFC, not one of our docs
QUOTED = re.compile(r'docs/([\w-]+)\.md\s+"([^"]+)"')
HEADING = re.compile(r"^#+\s+(?:(\d+(?:\.\d+)*)\.?\s+)?(.*)$")


def shared_design() -> Path:
    """The shared DESIGN.md (``../shared`` from the checkout root, CI's sibling checkout, else from a
    worktree's parent), which the docs cite as ``DESIGN §N``."""
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / "DESIGN.md").is_file():
            return base / "shared" / "DESIGN.md"
    return ROOT.parent / "shared" / "DESIGN.md"


def doc_file(doc: str) -> Path:
    return shared_design() if doc == "DESIGN" else ROOT / "docs" / f"{doc}.md"


def headings(doc: str) -> tuple[set[str], list[str]]:
    numbers, titles = set(), []
    for line in doc_file(doc).read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            if m[1]:
                numbers.add(m[1])
            titles.append(m[2].strip())
    return numbers, titles


def line_citations(line: str, itself: str, doc_pattern: re.Pattern[str] = DOC) -> list[tuple[str, str]]:
    """(doc, section or quoted title) for every citation on *line*.

    ``docs/X.md §N`` cites section N of X; a bare ``§N`` cites the doc named last before it on the
    same line, else *itself* (a doc citing itself; docs/design.md for code); ``docs/X.md "Title"``
    cites the heading that starts with Title.  *doc_pattern* is what names a doc (the docs also
    write ``X.md``).  ``RFC N §M`` cites an RFC and is left alone.
    """
    found = [(m[1], f'"{m[2]}"') for m in QUOTED.finditer(line)]
    for m in SECTION.finditer(line):
        if not RFC.search(line[: m.start()]):
            docs = [next(g for g in d.groups() if g) for d in doc_pattern.finditer(line[: m.start()])]
            found.append((docs[-1] if docs else itself, m[1]))
    return found


def citations(paths: list[Path], doc_pattern: re.Pattern[str] = DOC) -> list[tuple[str, int, str, str]]:
    """(file, line, doc, section or quoted title) for every citation in *paths* (``line_citations``)."""
    found = []
    for path in sorted(paths):
        rel = path.relative_to(ROOT)
        itself = path.stem if rel.parts[0] == "docs" else "design"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [(str(rel), number, doc, ref) for doc, ref in line_citations(line, itself, doc_pattern)]
    return found


def code_citations() -> list[tuple[str, int, str, str]]:
    """The citations in the code, tests and bench."""
    paths = [*(ROOT / "mailq").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py"),
             ROOT / "dev.py"]
    return citations([p for p in paths if p.name != "test_house.py"])


def doc_paths() -> list[Path]:
    """The docs whose citations are checked: docs/*.md, README.md and the READMEs under etc/."""
    return [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", *(ROOT / "etc").rglob("README*")]


def unresolved(cited: list[tuple[str, int, str, str]]) -> list[str]:
    """The citations in *cited* whose doc or section does not exist, as ``file:line: what``."""
    missing = []
    for file, line, doc, ref in cited:
        if not doc_file(doc).exists():
            missing.append(f"{file}:{line}: {doc_file(doc)} does not exist")
            continue
        numbers, titles = headings(doc)
        if ref.startswith('"'):
            if not any(t.startswith(ref.strip('"')) for t in titles):
                missing.append(f"{file}:{line}: {doc_file(doc).name} has no heading {ref}")
        elif ref not in numbers:
            missing.append(f"{file}:{line}: {doc_file(doc).name} has no section §{ref}")
    return missing


def test_every_section_the_code_cites_is_a_heading_of_the_doc_it_names():
    cited = code_citations()
    assert len(cited) > 40          # the scan sees the citations (a broken pattern would pass vacuously)
    missing = unresolved(cited)
    assert not missing, "\n".join(missing)


def test_every_section_the_docs_cite_is_a_heading_of_the_doc_it_names():
    paths = doc_paths()
    assert {"README.md", "etc/exim4/README", "etc/postfix/README", "docs/design.md"} <= {
        str(p.relative_to(ROOT)) for p in paths}
    cited = citations(paths, DOC_IN_DOCS)
    assert len(cited) > 40          # the scan sees the citations (a broken pattern would pass vacuously)
    missing = unresolved(cited)
    assert not missing, "\n".join(missing)


def test_the_docs_citation_rules_on_lines_as_the_docs_write_them():
    """A doc names another as docs/X.md, X.md or [X.md](X.md); a bare § is the doc named last, else itself."""
    assert line_citations("see [cluster.md](cluster.md) §4 and §7, then commands.md §3", "lists", DOC_IN_DOCS) == [
        ("cluster", "4"), ("cluster", "7"), ("commands", "3")]
    assert line_citations("as §2 says; a digest is RFC 2046 §5.1.5", "digests", DOC_IN_DOCS) == [("digests", "2")]
    assert line_citations("under the lock (DESIGN §4), once (design.md §3.10)", "lists", DOC_IN_DOCS) == [
        ("DESIGN", "4"), ("design", "3.10")]
    assert line_citations('docs/pipeline.md "Held messages" (§3.1)', "design", DOC_IN_DOCS) == [
        ("pipeline", '"Held messages"'), ("pipeline", "3.1")]
    assert unresolved([("docs/lists.md", 1, "cluster", "99"), ("docs/lists.md", 2, "nosuch", "1")]) == [
        "docs/lists.md:1: cluster.md has no section §99", f"docs/lists.md:2: {ROOT}/docs/nosuch.md does not exist"]


def test_the_layering_contract_refuses_an_upward_import(tmp_path):
    """`dev.py lint` runs import-linter on .importlinter; an import from queue up to the CLI must fail it."""
    shutil.copytree(ROOT / "mailq", tmp_path / "mailq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    lint = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    kept = subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    with open(tmp_path / "mailq" / "queue" / "entry.py", "a") as fh:
        fh.write("\nimport mailq.cli.queue  # noqa: E402\n")
    broken = subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1
    assert "BROKEN" in broken.stdout and "mailq.queue.entry -> mailq.cli.queue" in broken.stdout
