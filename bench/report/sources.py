"""The results files the document is written from: loading a JSON of bench/results, and saying
which command produced it and on which machine (card and CPU cores), in the document's words.

A few early files predate the benchmarks recording their own command line or CPU count;
`RECORDED_ELSEWHERE` names those for them (from the README's wording of the time and
bench/GPU_NOTES.md), and only where the JSON lacks the field.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"

# file -> what its JSON lacks: the command that wrote it and/or the machine's CPU cores
RECORDED_ELSEWHERE: dict[str, dict[str, str]] = {
    "attention_h200.json": {"command": "python -m bench.attention --quick", "cores": "16"},
    "worker_h200.json": {
        "command": "python -m bench.worker_gpu --N 8192,32768,131072 --memory-formats "
        "bf16/kv_group_mean,fp8/head+kbar,f32/head+kbar",
        "cores": "16",
    },
    "worker.json": {"command": "python -m bench.worker"},
    "worker_cpu_quick.json": {
        "command": "python -m bench.worker --quick --out bench/results/worker_cpu_quick.json"
    },
    "cluster.json": {"command": "python -m bench.cluster"},
    "chunking.json": {"command": "python -m bench.chunking", "machine": "x86_64, 2 cores"},
    "options_long.json": {"machine": "x86_64 16 cores, NVIDIA H200"},
}
for _name in ("check", "lookup", "bare", "bare_patched"):  # one bench.malformed run wrote all 4
    RECORDED_ELSEWHERE[f"malformed_{_name}.json"] = {
        "command": "python -m bench.malformed",
        "machine": "x86_64, 2 cores",
    }


@cache
def load(name: str) -> dict:
    """The JSON of bench/results/NAME (read once)."""
    return json.loads((RESULTS / name).read_text())


def describe(text: str) -> str:
    """A machine in the document's words: 'NVIDIA H200, 16 CPU cores' or 'x86_64, 2 CPU cores',
    from a JSON's machine or device field (which also carries versions and threads)."""
    gpu = re.search(r"NVIDIA [A-Z]\d+(?: \d+GB HBM3)?", text)
    cores = re.search(r"(\d+)[ -](?:host )?cores?", text)
    if gpu is None and cores is None:
        raise ValueError(f"no card and no CPU cores in {text!r}")
    head = gpu.group(0) if gpu else ("x86_64" if "x86_64" in text else "CPU")
    return head + (f", {cores.group(1)} CPU cores" if cores else "")


def machine(name: str) -> str:
    """Where bench/results/NAME was measured: its machine (or device) field, or the distinct
    machines of the runs it merges ("parts"), joined by "; "."""
    result, extra = load(name), RECORDED_ELSEWHERE.get(name, {})
    runs = result.get("parts") if isinstance(result.get("parts"), list) else []
    parts = [p["machine"] for p in runs if p.get("machine")]
    if parts:
        return "; ".join(dict.fromkeys(describe(p) for p in parts))
    text = result.get("machine") or result.get("device") or extra.get("machine")
    if text is None:
        raise ValueError(f"{name}: no machine recorded")
    if "cores" not in text and "cores" in extra:
        text = f"{text}, {extra['cores']} cores"
    return describe(text)


def command(name: str) -> str:
    """The command that wrote bench/results/NAME, without its `--note` texts (free prose,
    kept in the JSON)."""
    result = load(name)
    text = result.get("command") or RECORDED_ELSEWHERE.get(name, {}).get("command")
    if text is None:
        raise ValueError(f"{name}: no command recorded")
    return text.split(" --note ")[0].strip()


def source(*names: str, command_text: str | None = None) -> str:
    """The line under a table: the command, the machine and the JSON it comes from."""
    files = ", ".join(f"`bench/results/{n}`" for n in names)
    machines = "; ".join(dict.fromkeys(machine(n) for n in names))
    return f"Command: `{command_text or command(names[0])}`. Machine: {machines}. Data: {files}."
