"""The whole document: its sections in order, and the index of every results file."""

from __future__ import annotations

from bench.report import decode, faults, quality, service, validation
from bench.report.markdown import reflow, section, table
from bench.report.sources import RESULTS, command, load, machine

RESULTS_MD = RESULTS.parent / "RESULTS.md"
README_MD = RESULTS.parent.parent / "README.md"
FORBIDDEN = ("device tool",)  # the document names machines by card and cores alone

INTRO = """\
# memdb results

Written by `python -m bench.report` from `bench/results/*.json`; do not edit it by hand (the
tests fail when it is stale). Every number in a table is read from the JSON named under it,
with the command that wrote that JSON and the machine it ran on (card and CPU cores). The prose
between the tables is the team's reading of them. Words as in the README's glossary: **prefix
text**, **prefix KV**, **memory**, **rows** (the default format), **entries** (the paper's
looked-up format), **live KV**."""


def index() -> str:
    """Every JSON of bench/results (the quality runs folder aside), with what wrote it."""
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        name = path.name
        try:
            cmd = command(name)
        except ValueError:
            cmd = "not recorded"
        try:
            where = machine(name)
        except ValueError:
            where = "not recorded"
        cmd = cmd if len(cmd) <= 100 else cmd[:97] + "..."
        cmd = cmd if cmd == "not recorded" else f"`{cmd}`"
        rows.append([f"`{name}`", cmd, where, str(load(name).get("date", "-"))[:10]])
    return section(
        "## Every results file",
        "`bench/results/quality_runs/` holds the single runs that the quality files merge "
        "(their commands are in each merged file's `parts`).",
        table(["file", "command", "machine", "date"], rows),
    )  # fmt: skip


def render() -> str:
    """The text of bench/RESULTS.md."""
    parts = [
        INTRO,
        "## The server",
        service.reliability(),
        service.fuzz(),
        service.server(),
        service.cluster(),
        service.cluster_writes(),
        faults.cluster_faults(),
        service.malformed(),
        "## Memory quality",
        quality.smol(),
        quality.qwen(),
        quality.target_lines(),
        quality.reading(),
        validation.validation(),
        validation.previous_default(),
        validation.appending(),
        "## Decoding speed",
        decode.attention(),
        decode.fitted_attention(),
        decode.worker_gpu(),
        decode.worker_cpu(),
        decode.worker_cpu_default(),
        decode.demo(),
        index(),
    ]
    text = reflow("\n\n".join(parts)) + "\n"
    for word in FORBIDDEN:
        if word in text:
            raise ValueError(f"the document would say {word!r}; name the machine by card and cores")
    return text
