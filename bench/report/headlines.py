"""The README's results summary: a handful of headline figures from bench/results/*.json, each
with its command and machine, written between the README's `<!-- results:begin -->` and
`<!-- results:end -->` lines (the full tables are bench/RESULTS.md)."""

from __future__ import annotations

import re

from bench.quality.summary import targets
from bench.report.markdown import reflow, span
from bench.report.sources import command, load, machine

BLOCK = re.compile(r"^(<!-- results:begin -->\n).*?^(<!-- results:end -->)$", re.S | re.M)


def _where(name: str, cmd: str | None = None) -> str:
    return f"(`{cmd or command(name)}`; {machine(name)})"


def _ratio(target_line: str) -> str:
    """'6 of 7' from a target line of `bench.quality.summary.targets`."""
    return re.search(r": (\d+ of \d+)", target_line).group(1)


def quality() -> list[str]:
    smol, qwen = load("quality.json"), load("quality_qwen.json")
    out = []
    for name, r, model in (("quality.json", smol, "SmolLM2-135M"),
                           ("quality_qwen.json", qwen, "Qwen2.5-Coder-0.5B")):  # fmt: skip
        fid = [d["fidelity"]["4096"] for d in r["datasets"].values()]
        small = _ratio(targets(r)[1])
        out.append(
            f"- **Memory quality, {model}** (7 classification sets x 210 test examples): a "
            f"memory of M = 4096 rows follows the full prefix to a relative error of "
            f"{span([f['rel_err'] for f in fid], '.3f')} (next-token top-1 agreement "
            f"{span([f['top1_agree'] for f in fid], '.3f')}); a memory of <= 25% of the prefix "
            f"KV's bytes reaches >= 95% of full-prefix ICL's accuracy on {small} sets "
            + _where(name, "python -m bench.quality")
            + "."
        )
    long = [x for x in targets(smol) if x.startswith("- memory_32k_sink32_mean")]
    out.append(
        "- **32K prefix text, SmolLM2 (8K context)**: the default 32K memory (9.8% of the 32K "
        "prefix KV's bytes) matches or beats the best ICL that fits the context on "
        f"{_ratio(long[0])} sets " + _where("quality.json", "python -m bench.quality") + "."
    )
    return out


def speed() -> list[str]:
    att = load("attention_h200.json")
    cell = {(x["batch"], x["N"]): x for x in att["rows"]
            if x["scope"] == "layer" and x["memory_format"] == "bf16/kv_group_mean"}  # fmt: skip
    w = load("worker_h200.json")
    rows = {(x["way"], x.get("memory_format"), x["N"], x["c"]): x for x in w["rows"]}
    n, c = max(w["settings"]["N"]), max(w["settings"]["concurrency"])
    mem, full = rows[("memory", "bf16/kv_group_mean", n, c)], rows[("full_prefix", None, n, c)]
    cpu = load("worker.json")
    tok = {(x["way"], x["concurrency"]): x["tokens_per_s"] for x in cpu["rows"]}
    cs = sorted({x["concurrency"] for x in cpu["rows"]})
    over = " / ".join(f"{tok[('memory', k)] / tok[('full prefix (cached)', k)]:.2f}" for k in cs)
    quick = load("worker_cpu_quick.json")
    qtok = {(x["way"], x["concurrency"]): x["tokens_per_s"] for x in quick["rows"]}
    qcs = sorted({x["concurrency"] for x in quick["rows"]})
    q_over = " / ".join(
        f"{qtok[('memory', k)] / qtok[('full prefix (cached)', k)]:.2f}" for k in qcs
    )
    fit = load("attention_fitted_h100.json")
    fc = {(x["N"], x["M"]): x for x in fit["rows"] if x["batch"] == 8 and x["live_context"] == 64}
    f32, f128 = fc[(32768, 4096)], fc[(131072, 4096)]
    return [
        "- **Decode attention over the default memory, Llama-3.1-8B shape, batch 8**: fitted "
        f"rows (M = 4K, float8 keys, bf16 values) through their fused kernel take "
        f"{f32['memory_us']:.1f} µs per layer, {f32['speedup_vs_shared']:.2f}x / "
        f"{f128['speedup_vs_shared']:.2f}x faster than shared-prefix attention over a 32K / 128K "
        f"prefix KV, at {f32['vs_floor']:.1f}x their byte floor (issue 21's 1.3x target is "
        "missed) " + _where("attention_fitted_h100.json") + ". A 4K-entry memory of looked-up "
        "entries (bf16 keys, not the default) is "
        f"{cell[(8, 32768)]['speedup_vs_shared']:.2f}x / {cell[(8, 131072)]['speedup_vs_shared']:.2f}x "  # noqa: E501
        "faster than shared-prefix attention there " + _where("attention_h200.json") + ".",
        f"- **Worker decode step on the GPU** (CUDA graphs, 8B shape, {n // 1024}K prefix, "
        f"{c} requests): {mem['decode_tok_s']:,.0f} tokens/s with a memory of looked-up entries "
        "(not the default fitted rows: no graphed-step run of them yet) against "
        f"{full['decode_tok_s']:,.0f} with the prefix-cached full prefix "
        + _where("worker_h200.json", "python -m bench.worker_gpu")
        + ".",
        f"- **Worker on CPU** (SmolLM2, HTTP, concurrency {' / '.join(map(str, qcs))}): the "
        f"default memory (fitted rows) decodes {q_over}x the tokens/s of the prefix-cached full "
        "prefix in a one-round quick run "
        + _where("worker_cpu_quick.json")
        + f"; a memory of looked-up entries {over}x in the full run "
        + _where("worker.json")
        + ".",
    ]


def service() -> list[str]:
    rel, srv, clu = load("reliability.json"), load("server.json"), load("cluster.json")
    k, n = rel["parts"]["kills"], rel["parts"]["neighbours"]
    c = next(x for x in srv["lookup"] if (x["M"], x["dk"], x["batch"]) == (8192, 64, 64))
    return [
        f"- **Reliability**: {k['kills']} kill -9 during {k['acked_writes']:,} acknowledged "
        f"writes lost {k['lost_writes']} and left {k['partial_writes']} partial; a noisy "
        f"tenant raises another tenant's p99 {n['neighbour_p99_ratio']:.2f}x "
        + _where("reliability.json")
        + ".",
        f"- **Server Lookup** (M = 8K, batch 64): p50 {c['p50_ms']:.2f} ms, "
        f"{c['vectors_per_s']:,.0f} query vectors/s " + _where("server.json") + ".",
        f"- **Cluster**: 3 nodes serve {clu['speedup_3_vs_1']:.2f}x the Lookups of one; an "
        f"update reaches every node's watchers in {clu['watch_p99_ms']:.0f} ms (p99) "
        + _where("cluster.json")
        + ".",
    ]


def headlines() -> str:
    return reflow("\n".join([*quality(), *speed(), *service()]))


def with_headlines(readme: str) -> str:
    """The README's text with the headlines between its results markers."""
    if not BLOCK.search(readme):
        raise ValueError("README.md has no <!-- results:begin --> ... <!-- results:end --> lines")
    return BLOCK.sub(lambda m: m.group(1) + headlines() + "\n" + m.group(2), readme, count=1)
