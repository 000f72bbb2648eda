"""A fresh clone holds no issue tracker and no design notes from outside the repository, so nothing in it may send a
reader there: comments, docstrings, docs and test names give the reason in place."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what points outside: a ticket number, the design notes' file or section, the folder beside the checkout
OUTSIDE = re.compile(r"\b[Ii]ssue \d+|\bDESIGN(\.md| \d)|\.\./shared\b")


def references_outside(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if OUTSIDE.search(line)]


def test_no_tracked_file_cites_an_issue_or_notes_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ""} or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue  # this file spells out the patterns it looks for
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {line[:100]}" for line in references_outside(text)]
    assert not found, "say the reason in place instead of citing:\n" + "\n".join(found)


def test_the_pattern_finds_each_kind_of_citation():
    ticket, notes = "issue", "../shared/" + "DESIGN.md"  # spelled in parts, so this file cites nothing itself
    assert references_outside(f"see {ticket} 13 item 4") and references_outside(f"{ticket.title()} 10: partitions")
    assert references_outside("(DESIGN.md section 5)") and references_outside("per DESIGN 5b")
    assert references_outside(f"in `{notes}`")
    assert not references_outside("an issue with the tar reader; designs differ; shared/ memory")
