"""The team's findings: the static prose of bench/report/findings.md, placed beside the tables
by key (a line `<!-- key -->` starts each). Knows nothing of the JSON."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

FINDINGS = Path(__file__).with_name("findings.md")


@cache
def _findings() -> dict[str, str]:
    parts = re.split(r"^<!-- ([a-z0-9-]+) -->$", FINDINGS.read_text(), flags=re.M)
    return {key: text.strip() for key, text in zip(parts[1::2], parts[2::2], strict=True)}


def finding(key: str) -> str:
    """The text of one finding (paragraphs separated by blank lines)."""
    return _findings()[key]
