"""Every relative link in the Markdown docs, and every `docs/<file>.md#<anchor>` cited in code and
profiles, resolves to a file and (when given) to a heading of it (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "train" / "README.md", ROOT / "profiles" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED = re.compile(r"\bdocs/([a-z_]+\.md)(?:#([a-z0-9-]+))?")


def anchors(md: Path) -> set[str]:
    """GitHub heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out, fenced = set(), False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def check(target: Path, anchor: str | None, where: str) -> list[str]:
    if not target.exists():
        return [f"{where}: {target.relative_to(ROOT)} does not exist"]
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return [f"{where}: no heading for #{anchor} in {target.relative_to(ROOT)}"]
    return []


def test_markdown_links_resolve():
    problems = []
    for md in DOCS:
        for url in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", url):
                continue
            path, _, anchor = url.partition("#")
            target = (md.parent / path).resolve() if path else md
            problems += check(target, anchor or None, str(md.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_docs_citations_in_code_resolve():
    problems = []
    for folder in ("vramplan", "train", "tests", "benchmarks", "profiles"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix not in (".py", ".toml") or not f.is_file():
                continue
            for name, anchor in CITED.findall(f.read_text()):
                problems += check(ROOT / "docs" / name, anchor or None, str(f.relative_to(ROOT)))
    assert not problems, "\n".join(problems)
