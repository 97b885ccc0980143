"""The memory-quality sections: SmolLM2 and Qwen on the full protocol (bench/results/quality.json
and quality_qwen.json), their target lines and what the team reads in them. The tables are
`bench.quality.summary`'s, the ones `python -m bench.quality --table` prints."""

from __future__ import annotations

import statistics

from bench.quality.summary import bytes_table, count_table, fidelity_table, long_table, targets
from bench.report.findings import finding
from bench.report.markdown import section, span, table
from bench.report.sources import load, machine, source

SMOL, QWEN = "quality.json", "quality_qwen.json"


def _records(results: dict) -> list[dict]:
    return [rec for r in results["datasets"].values() for rec in r["per_seed"]]


def tables(results: dict) -> str:
    """Every table of one model's results: per byte, per count, fidelity, the 32K memories."""
    return section(
        finding("per-byte"),
        bytes_table(results),
        "Count-equal view (M tokens vs M entries; not equal bytes):",
        count_table(results),
        fidelity_table(results),
        finding("fidelity"),
        "32K memories (count view: each 32K memory at budget_32k entries):",
        long_table(results),
    )  # fmt: skip


def build_times() -> str:
    """Median build time per memory and budget, from each record's `build_s`."""
    rows = []
    for name, model in ((SMOL, "SmolLM2-135M-Instruct"), (QWEN, "Qwen2.5-Coder-0.5B-Instruct")):
        recs = _records(load(name))
        ms = sorted(recs[0]["build_s"], key=int)
        med = [statistics.median(rec["build_s"][m] for rec in recs) for m in ms]
        units = span([rec["timings"]["seed_s"] for rec in recs], ".0f")
        rows.append([model, *(f"{v:.1f}" for v in med), units])
    head = ["model", *(f"M = {m}: build (s)" for m in ms), "one (data set, seed) unit (s)"]
    return section(
        "Build time per memory on the GPU (calibration and fit; median over the (data set, "
        "seed) records' `build_s`; three SmolLM2 processes shared one GPU, Qwen's processes "
        "another):",
        table(head, rows),
    )  # fmt: skip


def smol() -> str:
    r = load(SMOL)
    return section(
        f"### Memory quality, SmolLM2-135M-Instruct, rows (2026-11-30; {machine(SMOL)})",
        finding("quality-protocol"),
        finding("quality-smol-runs"),
        source(SMOL),
        tables(r),
        "![quality](results/quality.png)",
    )  # fmt: skip


def qwen() -> str:
    r = load(QWEN)
    b32 = [rec["build_32k_s"] for rec in _records(r) if "build_32k_s" in rec]
    return section(
        f"### Memory quality, Qwen2.5-Coder-0.5B-Instruct, rows (2026-11-30; {machine(QWEN)})",
        finding("qwen-intro")
        + f" Each 32K memory took {span(b32, '.0f')} s to encode and build (`build_32k_s`).",
        source(QWEN),
        tables(r),
        "![quality, Qwen2.5-Coder-0.5B](results/quality_qwen.png)",
    )  # fmt: skip


def qwen_line(line: str) -> str:
    """A target line of Qwen's: '- Qwen: ' and the line's first letter in lower case."""
    return "- Qwen: " + line[2].lower() + line[3:]


def target_lines() -> str:
    return section(
        "#### Against the targets",
        "(`bench.quality.summary.targets`, the lines `--table` prints; SmolLM2 first, then Qwen.)",
        "\n".join(targets(load(SMOL))),
        "\n".join(qwen_line(line) for line in targets(load(QWEN))),
    )


def reading() -> str:
    """The team's reading of the quality figures (prose of the run of 2026-11-30)."""
    return section(
        "#### Reading (SmolLM2 unless named)",
        finding("reading"),
        build_times(),
    )  # fmt: skip
