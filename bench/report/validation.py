"""The sections on how the builder's defaults were chosen (`bench.options`, `bench.options_long`,
on validation examples carved from train, never test), the previous default's run, and
appending text to a memory (`bench.quality --append-budgets`, `bench.chunking`)."""

from __future__ import annotations

from bench.quality.summary import targets
from bench.report.findings import finding
from bench.report.markdown import section, table
from bench.report.quality import qwen_line
from bench.report.sources import load, source


def options_table(name: str) -> str:
    """A `bench.options` sweep: per variant (in the rule's ranking) its mean gain over ICL at
    equal bytes and, per budget M, the gain, relative error and top-1 agreement."""
    r = load(name)
    ms = sorted(r["budgets"])
    head = ["variant", "mean gain", "mean MB"]
    head += [f"M={m}: gain / rel err / top-1" for m in ms]
    rows = []
    for rank in r["picked"]["ranking"]:
        v = rank["variant"]
        cells = [r["summary"][f"{v}@{m}"] for m in ms]
        rows.append([
            f"**{v}**" if v == r["picked"]["variant"] else v,
            f"{rank['mean_gain']:+.3f}",
            f"{rank['mean_bytes'] / 1e6:.1f}",
            *(f"{c['gain_over_icl_equal_bytes']:+.3f} / {c['rel_err']:.3f} / "
              f"{c['top1_agree']:.3f}" for c in cells),
        ])  # fmt: skip
    resummarised = r.get("resummarised_by")
    note = f" (summary rewritten by `{resummarised.split(' /')[0]}`)" if resummarised else ""
    return section(source(name) + note, table(head, rows))


def options_long_table() -> str:
    r = load("options_long.json")
    rows = [
        [f"**{v}**" if v == r["picked"]["variant"] else v, f"{s['mean_gain']:+.3f}",
         f"{s['sets_at_least_best_icl']} of {s['sets']}"]
        for v, s in sorted(r["summary"].items(), key=lambda kv: -kv[1]["mean_gain"])
    ]  # fmt: skip
    return section(
        source("options_long.json"),
        table(["sink / chunk mass", "mean accuracy minus the best ICL that fits",
               "sets at least that ICL"], rows),  # fmt: skip
    )  # fmt: skip


def validation() -> str:
    return section(
        "### Validation: how the defaults were chosen",
        finding("validation-rule"),
        options_table("options.json"),
        finding("validation-gpu"),
        options_table("options_h200_fitted.json"),
        finding("validation-long"),
        options_long_table(),
        finding("validation-stored-keys"),
        options_table("options_stored_keys_smol.json"),
        options_table("options_stored_keys_qwen.json"),
    )  # fmt: skip


def previous_default() -> str:
    lines = [*targets(load("quality_kvg_mean.json"))]
    lines += [qwen_line(x) for x in targets(load("quality_qwen_kvg_mean.json"))]
    return section(
        "### The previous default: looked-up entries (`kvg_mean_bf16`)",
        finding("previous-default"),
        source("quality_kvg_mean.json", "quality_qwen_kvg_mean.json"),
        "\n".join(lines),
    )


def appending() -> str:
    a = load("append_default_cpu.json")
    ((m, ap),) = a["datasets"]["trec"]["append"].items()
    f32 = load("quality_f32_head.json")
    rows = []
    for name, r in f32["datasets"].items():
        (x,) = r["append"].values()
        rows.append([name, *(f"{x[f'acc_{w}']:.3f}" for w in ("half", "append", "rebuilt")),
                     *(f"{x[f'fidelity_{w}']['rel_err']:.3f} / {x[f'fidelity_{w}']['kl']:.3f}"
                       for w in ("half", "append", "rebuilt"))])  # fmt: skip
    (m32,) = {k for r in f32["datasets"].values() for k in r["append"]}
    c = load("chunking.json")
    crow = [[x["sink"], "yes" if x["true_positions"] else "no (positions 0..)",
             f"{x['rel_err']:.3f}", f"{x['top1_agree']:.3f}", f"{x['kl']:.3f}"]
            for x in c["rows"]]  # fmt: skip
    return section(
        "### Appending (`memdb-admin prefix append`)",
        "To a memory of rows, appending adds the new text's own keys and values as rows (bias "
        "0; M grows by its tokens), which is exact for the new text "
        "(tests/test_worker_fitted.py compares it with the joined exact prefix); a rebuild fits "
        "it down. To looked-up entries, the append merges every entry's state on the new text, "
        "with each head's entry query estimated from the group-mean key when the memory does "
        "not store it (`worker/memdb_worker/memory/head_queries.py`). Measured before the switch "
        "to rows, so on the looked-up kv_group_mean defaults of that time (trec, a ~2K prefix "
        f"half built and half appended, M = {m}): relative error half "
        f"{ap['fidelity_half']['rel_err']:.3f}, appended {ap['fidelity_append']['rel_err']:.3f}, "
        f"rebuilt {ap['fidelity_rebuilt']['rel_err']:.3f}; accuracy {ap['acc_half']:.3f} / "
        f"{ap['acc_append']:.3f} / {ap['acc_rebuilt']:.3f} ({len(ap['seeds'])} x "
        f"{a['config']['per_seed']} examples).",
        source("append_default_cpu.json"),
        f"The float32 per-head entries of 2026-11-26 (seed 0, M = {m32}, 70 examples):",
        source("quality_f32_head.json"),
        table(["data set", "half", "appended", "rebuilt", "half: err / KL",
               "appended: err / KL", "rebuilt: err / KL"], rows),  # fmt: skip
        "Appending recovers most of the missing text's attention output because the new text is "
        "encoded at its true positions after the prefix's first 32 tokens. KL moves a third to "
        "two thirds of the way to the rebuild's, except on trec. Accuracy is mixed (one seed): "
        "the appended entries keep the keys and the calibration queries of the half prefix. "
        f"`bench.chunking` shows why (exact states, no memory; {c['model']}, a "
        f"{c['prefix_tokens']}-token prefix in chunks of {' + '.join(map(str, c['chunks']))} "
        "tokens): the second chunk encoded alone at positions 0.. against at its true positions "
        "after a sink of the first tokens, both against the one-chunk prefix.",
        source("chunking.json"),
        table(["sink tokens", "true positions", "rel err", "top-1", "KL"], crow),
    )  # fmt: skip
