"""Markdown pieces of the results document: tables and number formats. Knows nothing of the
benchmarks."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: one header row, then the rows (cells already formatted)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def span(values: Sequence[float], fmt: str = ".2f", unit: str = "") -> str:
    """'lo-hi' of some values ('v' when they round equal), with a unit after."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return (lo if lo == hi else f"{lo}-{hi}") + unit


def count(n: float) -> str:
    """An integer with thousands separators."""
    return f"{n:,.0f}"


def reflow(text: str, width: int = 100) -> str:
    """Prose paragraphs and bullet items wrapped at `width`; headings, tables and images kept
    as they are (blocks are separated by blank lines)."""
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if block.startswith(("|", "#", "![")):
            out.append(block)
        elif all(line.startswith("- ") for line in lines):
            out.append("\n".join(_fill(line, width, "  ") for line in lines))
        else:
            out.append(_fill(" ".join(lines), width, ""))
    return "\n\n".join(out)


def _fill(text: str, width: int, indent: str) -> str:
    return textwrap.fill(text, width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)  # fmt: skip


def section(*blocks: str) -> str:
    """Blocks (a heading, paragraphs, tables) one blank line apart."""
    return "\n\n".join(blocks)
