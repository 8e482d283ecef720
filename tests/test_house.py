"""The house rules that a reader relies on: cited doc sections exist, imports follow the layers."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

DOC = re.compile(r"docs/([\w-]+)\.md")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
QUOTED = re.compile(r'docs/([\w-]+)\.md\s+"([^"]+)"')
HEADING = re.compile(r"^#+\s+(?:(\d+(?:\.\d+)*)\.?\s+)?(.*)$")


def headings(doc: str) -> tuple[set[str], list[str]]:
    numbers, titles = set(), []
    for line in (ROOT / "docs" / f"{doc}.md").read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            if m[1]:
                numbers.add(m[1])
            titles.append(m[2].strip())
    return numbers, titles


def citations() -> list[tuple[str, int, str, str]]:
    """(file, line, doc, section or quoted title) for every citation in the code, tests and bench.

    ``docs/X.md §N`` cites section N of X; a bare ``§N`` cites the doc named last before it on the
    same line, else docs/design.md; ``docs/X.md "Title"`` cites the heading that starts with Title.
    """
    found = []
    for path in sorted([*(ROOT / "mailq").rglob("*.py"), *(ROOT / "bench").glob("*.py"),
                        *(ROOT / "tests").glob("*.py"), ROOT / "dev.py"]):
        if path.name == "test_house.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in QUOTED.finditer(line):
                found.append((str(path.relative_to(ROOT)), number, m[1], f'"{m[2]}"'))
            for m in SECTION.finditer(line):
                docs = DOC.findall(line[: m.start()])
                found.append((str(path.relative_to(ROOT)), number, docs[-1] if docs else "design", m[1]))
    return found


def test_every_section_the_code_cites_is_a_heading_of_the_doc_it_names():
    cited = citations()
    assert len(cited) > 40          # the scan sees the citations (a broken pattern would pass vacuously)
    missing = []
    for file, line, doc, ref in cited:
        if not (ROOT / "docs" / f"{doc}.md").exists():
            missing.append(f"{file}:{line}: docs/{doc}.md does not exist")
            continue
        numbers, titles = headings(doc)
        if ref.startswith('"'):
            if not any(t.startswith(ref.strip('"')) for t in titles):
                missing.append(f"{file}:{line}: docs/{doc}.md has no heading {ref}")
        elif ref not in numbers:
            missing.append(f"{file}:{line}: docs/{doc}.md has no section §{ref}")
    assert not missing, "\n".join(missing)


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
