"""The plot of bench.quality: accuracy against bytes per data set (ICL cut at T tokens, its KV in
bfloat16; memories as stored), from a results dict. Knows nothing of how they were measured."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(results["datasets"])
    if not names:
        return
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = results["datasets"][name]
        b, sp = r["bytes"], r.get("spread", {})
        ms = sorted(int(m) for m in r["icl"])
        icl_x = [b["icl"][str(m)] / 1e6 for m in ms] + [b["kv_full"] / 1e6]
        icl_y = [r["icl"][str(m)] for m in ms] + [r["icl_full"]]
        icl_e = [sp.get("icl", {}).get(str(m), {}).get("std", 0.0) for m in ms]
        icl_e.append(sp.get("icl_full", {}).get("std", 0.0))
        ax.errorbar(icl_x, icl_y, yerr=icl_e, fmt="o-", capsize=3, label="ICL (T tokens, bf16 KV)")
        mem_x = [b["memory"][str(m)] / 1e6 for m in ms]
        mem_y = [r["memory"][str(m)] for m in ms]
        mem_e = [sp.get("memory", {}).get(str(m), {}).get("std", 0.0) for m in ms]
        ax.errorbar(mem_x, mem_y, yerr=mem_e, fmt="s-", capsize=3, label="memory (M entries)")
        for m, x, y in zip(ms, mem_x, mem_y, strict=True):
            ax.annotate(str(m), (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
        ax.axhline(r["zero_shot"], color="gray", ls=":", label="zero-shot")
        ax.axvline(b["kv_full"] / 1e6, color="k", ls="--", lw=0.8, label="full prefix KV")
        if r.get("memory_32k") is not None and "memory_32k" in b:
            ax.plot([b["memory_32k"] / 1e6], [r["memory_32k"]], "r*", ms=9, label="memory 32K")
            for key in sorted(k for k in r if k.startswith("memory_32k_sink") and "_norm" not in k):
                ax.plot([b["memory_32k"] / 1e6], [r[key]], "mx", ms=7,
                        label="memory 32K, " + key.removeprefix("memory_32k_"))  # fmt: skip
            if r.get("icl_32k") is not None and b.get("kv_32k"):
                ax.plot([b["kv_32k"] / 1e6], [r["icl_32k"]], "kD", ms=6, label="ICL, whole 32K")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name} (n={r['n_test']})")
        ax.set_xlabel("bytes (MB, log)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{results['model']}: accuracy against bytes, ICL vs attention-state memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
