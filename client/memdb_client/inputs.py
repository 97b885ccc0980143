"""Input files of `memdb-admin`: a prefix or traces as plain text, or JSONL examples.

- plain text: the prefix is the file as it is; as traces, its paragraphs (blocks separated by
  blank lines) are the traces.
- JSONL: one JSON object per line (e.g. `{"text": ..., "label": ...}` as in ../shared/data);
  each line is rendered with a `str.format` template over the object's fields (default
  `DEFAULT_TEMPLATE`). The prefix is the rendered examples concatenated; as traces, each
  rendered example is one trace.

`auto` picks JSONL for .jsonl/.ndjson files and plain text otherwise. Every problem raises
`InputError` with one line naming the file (and line) and what to do. No torch here.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_TEMPLATE = "Input: {text}\nLabel: {label}\n\n"
InputFormat = Literal["auto", "text", "jsonl"]
INPUT_FORMATS = ("auto", "text", "jsonl")
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "r": "\r"}


class InputError(ValueError):
    """Bad input file or template: the message is one line meant for a person."""


@dataclass(frozen=True)
class Source:
    """What was read from one file."""

    path: str
    kind: Literal["text", "jsonl"]
    items: list[str]  # rendered examples (JSONL) or paragraphs (text)
    text: str  # the file as one prefix

    @property
    def chars(self) -> int:
        return len(self.text)


def unescape(template: str) -> str:
    r"""Turn the two-character escapes \n, \t, \r and \\ typed on a command line into characters."""
    return re.sub(r"\\([nt\\r])", lambda m: _ESCAPES[m.group(1)], template)


def read_source(
    path: str | Path,
    *,
    what: str = "prefix",
    input_format: InputFormat = "auto",
    template: str = DEFAULT_TEMPLATE,
    skip: int = 0,
    limit: int | None = None,
) -> Source:
    """Read a prefix or traces file (`-` is stdin); `skip`/`limit` select examples/paragraphs."""
    if skip < 0 or (limit is not None and limit < 0):
        raise InputError(f"{what}: skip and limit must be >= 0")
    name = str(path)
    raw = _read_text(name, what)
    kind = input_format
    if kind == "auto":
        kind = "jsonl" if Path(name).suffix.lower() in _JSONL_SUFFIXES else "text"
    if kind not in ("text", "jsonl"):
        raise InputError(f"{what} format must be one of {', '.join(INPUT_FORMATS)}, not {kind!r}")
    if kind == "jsonl":
        items = _render_jsonl(raw, name, what, template, skip, limit)
        text = "".join(items)
    else:
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
        end = None if limit is None else skip + limit
        items = paragraphs[skip:end]
        text = raw if (skip == 0 and limit is None) else "\n\n".join(items)
    if not text.strip():
        detail = "no examples were selected" if kind == "jsonl" else "it holds no text"
        raise InputError(f"{what} file '{name}' is empty: {detail}")
    return Source(name, kind, items, text)


def _read_text(name: str, what: str) -> str:
    if name == "-":
        return sys.stdin.read()
    p = Path(name)
    if not p.exists():
        raise InputError(f"{what} file '{name}' does not exist")
    if p.is_dir():
        raise InputError(f"{what} file '{name}' is a directory; pass a text or JSONL file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} file '{name}' is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} file '{name}': {exc.strerror}") from None


def _render_jsonl(
    raw: str, name: str, what: str, template: str, skip: int, limit: int | None
) -> list[str]:
    items: list[str] = []
    seen = 0
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(items) >= limit:
            break
        seen += 1
        if seen <= skip:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(
                f'{name}:{lineno}: expected a JSON object like {{"text": ..., "label": ...}}'
            )
        try:
            items.append(template.format_map(record))
        except KeyError as exc:
            have = ", ".join(sorted(record)) or "none"
            raise InputError(
                f"{name}:{lineno}: the {what} template needs the field {exc} but the record has "
                f"{have}; fix --format"
            ) from None
        except (ValueError, IndexError) as exc:
            raise InputError(
                f"the {what} template {template!r} is not a valid format: {exc}"
            ) from None
    return items
