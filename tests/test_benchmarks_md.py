"""BENCHMARKS.md: every benchmark section (`bench.common.write_section`) appears once, opened and closed, and no
long paragraph of the notes between them twice.

`write_section` replaces every copy of a section, so a duplicated stretch of the file (2026-12-07: 528 lines, a
stale copy of the core notes and of every later section, written twice by an edit) stayed unnoticed and kept
being updated in both places."""

import re
from collections import Counter
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def test_every_benchmark_section_appears_once_and_is_closed():
    text = BENCHMARKS.read_text()
    opened = Counter(re.findall(r"<!-- bench:([\w.-]+) -->", text))
    closed = Counter(re.findall(r"<!-- /bench:([\w.-]+) -->", text))
    assert opened and opened == closed, (opened, closed)
    assert [name for name, n in opened.items() if n > 1] == []
    prose = re.sub(r"<!-- bench:([\w.-]+) -->.*?<!-- /bench:\1 -->", "", text, flags=re.S)  # (tables repeat)
    paragraphs = [p for p in re.split(r"\n\s*\n", prose) if len(p) > 400]
    assert [p[:80] for p, n in Counter(paragraphs).items() if n > 1] == []
