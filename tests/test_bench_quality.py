"""Smoke tests of the quality benchmark's pure pieces (no model load)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from bench import quality as q
from tests.tiny import tiny_llama


def _rows(n_per_label: dict[str, int]) -> list[dict]:
    rows = []
    for lab, n in n_per_label.items():
        rows += [{"text": f"{lab} example {i}", "label": lab} for i in range(n)]
    return rows


def test_prompt_format():
    assert q.format_demo("How far is it ?", "number") == "How far is it ?\nLabel: number\n\n"
    assert q.format_query("How far is it ?") == "How far is it ?\nLabel:"
    assert q.format_query("x") + q.format_label("y") + "\n\n" == q.format_demo("x", "y")


def test_balanced_order_is_seeded_and_balanced():
    rows = _rows({"a": 50, "b": 30, "c": 5})
    o1, o2, o3 = q.balanced_order(rows, 0), q.balanced_order(rows, 0), q.balanced_order(rows, 1)
    assert o1 == o2 and o1 != o3
    assert sorted(o1) == list(range(len(rows)))  # a permutation
    first = Counter(rows[i]["label"] for i in o1[:15])
    assert first == {"a": 5, "b": 5, "c": 5}  # any prefix is balanced while pools last
    after = Counter(rows[i]["label"] for i in o1[15:25])
    assert after == {"a": 5, "b": 5}


def test_plan_seed_fills_budget_and_never_mixes_sets():
    train = _rows({"a": 40, "b": 40, "c": 40})
    lengths = [10] * len(train)
    test_idx = q.test_slices(100, [0, 1, 2], 20)
    assert all(len(v) == 20 for v in test_idx.values())
    flat = [i for v in test_idx.values() for i in v]
    assert len(set(flat)) == 60  # disjoint across seeds
    plan = q.plan_seed(train, lengths, 0, 305, 905, 20, test_idx[0])
    assert len(plan.demos) == 30 and len(plan.demos32k) == 90
    assert Counter(train[i]["label"] for i in plan.demos) == {"a": 10, "b": 10, "c": 10}
    assert set(plan.demos) <= set(plan.demos32k)  # the 32K prefix extends the full one
    assert not set(plan.traces) & set(plan.demos32k)  # traces are other training examples
    assert len(plan.traces) == 20
    assert plan.test == test_idx[0]
    again = q.plan_seed(train, lengths, 0, 305, 905, 20, test_idx[0])
    assert again == plan
    other = q.plan_seed(train, lengths, 1, 305, 905, 20, test_idx[1])
    assert other.demos != plan.demos


def test_take_to_budget():
    assert q.take_to_budget([3, 3, 3], 7) == 2
    assert q.take_to_budget([3, 3], 100) == 2
    assert q.take_to_budget([8], 7) == 0


def _seed_record(seed, base):
    ms = [512, 1024]
    return {
        "seed": seed,
        "n_test": 10,
        "prefix_tokens": 2000,
        "kv_bytes_per_token": 100,
        "acc": {
            "zero_shot": 0.1,
            "icl_full": base,
            "memory_32k": base,
            "icl": {str(m): base / 2 for m in ms},
            "memory": {str(m): base for m in ms},
        },
        "acc_norm": {
            "zero_shot": 0.1,
            "icl_full": base,
            "memory_32k": base,
            "icl": {str(m): base for m in ms},
            "memory": {str(m): base for m in ms},
        },
        "fidelity": {
            str(m): {"rel_err": 0.1, "top1_agree": 0.9, "kl": 0.01, "per_layer_rel_err": [0.1, 0.1]}
            for m in ms
        },
        "bytes": {str(m): {"memory": m * 10, "kv_prefix": 5000} for m in ms},
        "build_s": {str(m): 1.0 for m in ms},
    }


def test_results_format_and_writer(tmp_path):
    recs = [_seed_record(0, 0.4), _seed_record(1, 0.6)]
    ds = q.dataset_summary(recs, [512, 1024], 20, {"num_labels": 6})
    assert ds["n_test"] == 20
    assert ds["zero_shot"] == pytest.approx(0.1)
    assert ds["icl_full"] == pytest.approx(0.5)
    assert ds["icl"] == {"512": pytest.approx(0.25), "1024": pytest.approx(0.25)}
    assert ds["memory"]["1024"] == pytest.approx(0.5)
    assert ds["spread"]["memory"]["1024"]["min"] == pytest.approx(0.4)
    assert set(ds["fidelity"]["512"]) >= {"rel_err", "top1_agree", "kl"}
    assert ds["bytes"]["kv_full"] == 200_000  # 100 B per token x 2000 prefix tokens
    assert ds["bytes"]["icl"] == {"512": 51_200, "1024": 102_400}
    assert ds["bytes"]["memory"] == {"512": 5120, "1024": 10240}
    # memories smaller than ICL@512: ICL interpolated between zero-shot (0 B) and ICL@512
    row = ds["equal_bytes"][0]
    assert row["M"] == 512 and row["bytes"] == 5120 and row["icl_how"] == "interpolated"
    assert row["icl"] == pytest.approx(0.1 + (0.25 - 0.1) * 5120 / 51_200)
    assert ds["build_s"]["1024"] == 1.0
    results = {"model": "m", "datasets": {"toy": ds}}
    out = tmp_path / "quality.json"
    q.write_json(out, results)
    back = json.loads(out.read_text())
    assert back["datasets"]["toy"]["memory"]["512"] == pytest.approx(0.5)
    for v in [*back["datasets"]["toy"]["icl"].values(), back["datasets"]["toy"]["icl_full"]]:
        assert 0.0 <= v <= 1.0
    q.plot(results, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_calibrate_accepts_an_encoded_prefix():
    from memdb_worker.build.builder import calibrate
    from memdb_worker.model.prefix import encode_prefix

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    model = tiny_llama(64, **small, max_position_embeddings=128, initializer_range=0.02,
                       pad_token_id=None)  # fmt: skip
    prefix = list(range(3, 40))
    traces = [[5, 6, 7, 8], [9, 10, 11]]
    a = calibrate(model, None, prefix, traces, progress=False)
    b = calibrate(model, None, encode_prefix(model, prefix), traces, progress=False)
    assert b.prefix_kv.token_count == len(prefix)
    for x, y in zip(a.lse, b.lse, strict=True):
        assert torch.equal(x, y)


def test_test_slices_depend_on_the_seed_not_on_the_seed_list():
    full = q.test_slices(300, [0, 1, 2], 30)
    assert q.test_slices(300, [2], 30)[2] == full[2]
    assert q.test_slices(300, [1, 2], 30)[1] == full[1]


def test_merge_runs_of_different_seeds():
    ms = [512, 1024]
    a = {"model": "m", "config": {"budgets": ms, "seeds": [0, 1]}, "command": "a", "datasets": {}}
    b = {"model": "m", "config": {"budgets": ms, "seeds": [2]}, "command": "b", "datasets": {}}
    a["datasets"]["toy"] = q.dataset_summary([_seed_record(0, 0.4), _seed_record(1, 0.6)], ms, 20)
    b["datasets"]["toy"] = q.dataset_summary([_seed_record(2, 0.8)], ms, 10)
    merged = q.merge_results([a, b])
    toy = merged["datasets"]["toy"]
    assert toy["seeds"] == [0, 1, 2] and toy["n_test"] == 30
    assert toy["icl_full"] == pytest.approx(0.6)
    assert [p["command"] for p in merged["parts"]] == ["a", "b"]
    assert merged["config"]["seeds"] == [0, 1, 2] and a["config"]["seeds"] == [0, 1]


def test_32k_variant_keys_and_a_later_run_keeps_an_earlier_runs_32k_measurements():
    from bench.quality.protocol import long_key

    assert long_key(0, 32, "sum") == "memory_32k"  # the first sink, summed (legacy name)
    assert long_key(1, 0, "sum") == "memory_32k_sink0"
    assert long_key(0, 32, "mean") == "memory_32k_sink32_mean"
    assert long_key(0, 0, "mean") == "memory_32k_sink0_mean"
    ms = [512, 1024]
    old, new = _seed_record(0, 0.4), _seed_record(0, 0.6)  # new: a phase-1 rerun, no 32K
    old["acc"]["icl_32k"] = old["acc_norm"]["icl_32k"] = 0.7
    old["bytes_32k"], old["prefix32k_tokens"] = {"memory": 1, "kv_prefix": 2}, 1000
    for rec in (new["acc"], new["acc_norm"]):
        del rec["memory_32k"]
    parts = []
    for rec, cmd in ((old, "old"), (new, "rerun")):
        part = {"model": "m", "config": {"budgets": ms, "seeds": [0]}, "command": cmd}
        part["datasets"] = {"toy": q.dataset_summary([rec], ms, 10)}
        parts.append(part)
    toy = q.merge_results(parts)["datasets"]["toy"]
    assert toy["icl_full"] == pytest.approx(0.6)  # the later run's phase 1
    again = {**parts[1], "command": "rerun again"}  # a third run: the 32K still from "old"
    (rec3,) = q.merge_results([*parts, again])["datasets"]["toy"]["per_seed"]
    assert rec3["long_from"] == {"memory_32k": "old", "icl_32k": "old"}
    assert toy["memory_32k"] == pytest.approx(0.4) and toy["icl_32k"] == pytest.approx(0.7)
    (rec,) = toy["per_seed"]
    assert rec["long_from"] == {"memory_32k": "old", "icl_32k": "old"}
    assert rec["bytes_32k"] == {"memory": 1, "kv_prefix": 2} and toy["n_test"] == 10


def test_dropping_32k_variants_for_a_redo_and_filling_them_back_round_trips():
    from bench.quality.protocol import Config, long_variants
    from bench.quality.summary import drop_long, fill_long

    cfg = Config(sinks_32k=(0,), masses_32k=("sum", "mean"))
    assert long_variants(cfg) == [("memory_32k", 0, "sum"), ("memory_32k_sink0_mean", 0, "mean")]
    rec = _seed_record(0, 0.4)
    rec["acc"]["icl_32k"] = rec["acc_norm"]["icl_32k"] = 0.7
    rec["acc"]["memory_32k_sink0_mean"] = rec["acc_norm"]["memory_32k_sink0_mean"] = 0.3
    rec.update(bytes_32k={"memory": 1}, build_32k_s=5.0, build_32k_s_sink0_mean=6.0,
               n_demos_32k=40, long_from=dict.fromkeys(["memory_32k", "memory_32k_sink0_mean",
                                                        "icl_32k"], "old"))  # fmt: skip
    keys = [k for k, _, _ in long_variants(cfg)]
    dropped = drop_long(rec, keys)
    assert not {"memory_32k", "memory_32k_sink0_mean"} & set(dropped["acc"])
    assert not {"bytes_32k", "build_32k_s", "build_32k_s_sink0_mean"} & set(dropped)
    # ICL over the 32K prefix and the plan's demonstration count stay, with their provenance
    assert dropped["acc"]["icl_32k"] == 0.7 and dropped["n_demos_32k"] == 40
    assert dropped["long_from"] == {"icl_32k": "old"}
    assert rec["acc"]["memory_32k"] == 0.4  # the input is not modified
    back = fill_long(dropped, rec, "old")
    assert back == rec


def test_targets_and_32k_table_from_the_summaries():
    from bench.quality.summary import long_table, targets

    ms = [512, 1024]
    recs = [_seed_record(0, 0.4), _seed_record(1, 0.6)]  # memory 0.5, ICL cuts 0.25, full 0.5
    for r in recs:
        r["acc"]["icl_32k"] = r["acc_norm"]["icl_32k"] = 0.52  # the memory (0.5) is 2 points below
        r["bytes_32k"] = {"memory": 20_000, "kv_prefix": 0}
        r["prefix32k_tokens"] = 1000  # 100 B per token: KV 100,000 B, the memory 20%
    ds = q.dataset_summary(recs, ms, 20)
    lines = targets({"datasets": {"toy": ds}})
    assert lines[0].endswith("1 of 1 sets (toy 2/2): met.")  # memory 0.5 > ICL at equal bytes
    assert "1 of 1 (toy 100% (M=512))" in lines[1]  # 5,120 B <= 25% of 200,000 B, 0.5 / 0.5
    assert "within 3 points" in lines[2] and "1 of 1" in lines[2] and "20.0%" in lines[2]
    assert lines[3].endswith("1 of 1 (toy 0.100 / 0.900): met.")
    assert "0.0 MB / 0.1 MB (20.0%)" in long_table({"datasets": {"toy": ds}})
    for r in recs:
        r["acc"]["icl_32k"] = r["acc_norm"]["icl_32k"] = 0.6
    lines = targets({"datasets": {"toy": q.dataset_summary(recs, ms, 20)}})
    assert "0 of 1" in lines[2] and lines[2].endswith("not met.")


def test_equal_bytes_interpolates_icl_between_cuts_by_hand():
    # 100 B per token; ICL@512 = 51,200 B -> 0.2, ICL@1024 = 102,400 B -> 0.4, full 2000
    # tokens = 200,000 B -> 0.8, zero-shot 0.1 at 0 B
    summary = {
        "zero_shot": 0.1,
        "icl_full": 0.8,
        "icl": {"512": 0.2, "1024": 0.4},
        "memory": {"256": 0.5, "512": 0.6, "1024": 0.7, "2048": 0.9},
        "bytes": {
            "kv_full": 200_000,
            "icl": {"512": 51_200, "1024": 102_400},
            "memory": {"256": 25_600, "512": 76_800, "1024": 150_000, "2048": 300_000},
        },
    }
    rows = {r["M"]: r for r in q.equal_bytes(summary)}
    assert rows[256]["icl"] == pytest.approx(0.15)  # halfway from 0 B (0.1) to 51,200 B (0.2)
    assert rows[512]["icl"] == pytest.approx(0.3)  # halfway from 51,200 (0.2) to 102,400 (0.4)
    assert rows[1024]["icl"] == pytest.approx(0.4 + 0.4 * 47_600 / 97_600)
    assert rows[2048]["icl"] == 0.8 and rows[2048]["icl_how"] == "full prefix"
    assert {rows[m]["icl_how"] for m in (256, 512, 1024)} == {"interpolated"}
    assert rows[2048]["bytes_vs_kv_full"] == pytest.approx(1.5)
    assert q.icl_at_bytes([(0, 0.1), (51_200, 0.2)], 51_200) == (0.2, "measured")


def test_old_records_get_bf16_kv_bytes_from_their_float32_kv():
    rec = _seed_record(0, 0.5)
    del rec["kv_bytes_per_token"]
    for m in rec["bytes"]:
        rec["bytes"][m]["kv_prefix"] = 2000 * 200  # float32 KV: 2 x the bf16 bytes per token
    assert q.bytes_summary([rec], [512, 1024])["kv_full"] == 200_000


def test_rebuild_summary_recomputes_bytes_from_records_without_a_model():
    ms = [512, 1024]
    ds = q.dataset_summary([_seed_record(0, 0.4), _seed_record(1, 0.6)], ms, 20)
    stale = {k: v for k, v in ds.items() if k not in ("bytes", "equal_bytes")}
    results = {"model": "m", "config": {"budgets": ms}, "notes": {"a": "b"},
               "datasets": {"toy": stale}}  # fmt: skip
    rebuilt = q.rebuild_summary(results, "python -m bench.quality --rebuild-summary")
    toy = rebuilt["datasets"]["toy"]
    assert toy["bytes"] == ds["bytes"] and toy["equal_bytes"] == ds["equal_bytes"]
    # a run made before validation chose the defaults is not stamped as if it had been
    assert rebuilt["defaults_from"] is None
    assert (
        q.rebuild_summary({**results, "defaults_from": "x.json"}, "c")["defaults_from"] == "x.json"
    )
    assert rebuilt["notes"] == {"a": "b"} and "summary_rebuilt" in rebuilt


def test_validation_split_is_disjoint_from_demonstrations_traces_and_fixed():
    train = _rows({"a": 100, "b": 100, "c": 100})
    val, rest = q.split_validation(len(train), 40)
    assert len(val) == 40 and sorted(val + rest) == list(range(300))
    assert q.split_validation(len(train), 40) == (val, rest)  # seeded, not per run
    pool = [train[i] for i in rest]
    plan = q.plan_seed(pool, [10] * len(pool), 0, 305, 905, 50, [])
    used = {rest[i] for i in plan.demos32k + plan.traces}  # back to indices of train
    assert len(plan.traces) == 50 and len(plan.demos32k) == 90
    assert not used & set(val)
    with pytest.raises(ValueError, match="cannot carve"):
        q.split_validation(10, 10)


def test_notes_are_key_text_pairs():
    from bench.quality.run import parse_notes

    assert parse_notes(["sink=not settled", "a=b=c"]) == {"sink": "not settled", "a": "b=c"}
    with pytest.raises(ValueError, match="KEY=TEXT"):
        parse_notes(["no equals sign"])


def test_options_pick_the_variant_of_the_best_mean_gain_over_budgets_then_fewer_bytes():
    from bench.options import pick

    def cell(variant, m, gain, nbytes):
        return {"variant": variant, "M": m, "gain_over_icl_equal_bytes": gain, "bytes": nbytes}

    summary = {  # "a" has the single best cell but the worse mean; "b" and "c" tie, c is smaller
        "a@128": cell("a", 128, 0.30, 10), "a@512": cell("a", 512, -0.30, 40),
        "b@128": cell("b", 128, 0.05, 30), "b@512": cell("b", 512, 0.05, 90),
        "c@128": cell("c", 128, 0.00, 20), "c@512": cell("c", 512, 0.10, 60),
    }  # fmt: skip
    got = pick(summary)
    assert got["variant"] == "c" and list(got["cells"]) == ["c@128", "c@512"]
    assert [r["variant"] for r in got["ranking"]] == ["c", "b", "a"]
    assert got["mean_gain"] == pytest.approx(0.05)


def test_validation_rows_are_never_demonstrations_32k_demonstrations_or_traces():
    from types import SimpleNamespace

    train = _rows({"a": 60, "b": 60, "c": 60})
    task = SimpleNamespace(train=train, demo_ids=[[1] * 10 for _ in train])
    rows, plan = q.plan_validation(task, 0, 50, 40, 305, 605, 30)
    assert len(rows) == 40 and len(plan.demos) == 30 and len(plan.demos32k) == 60
    assert len(plan.traces) == 30 and plan.demos32k[:30] == plan.demos
    used = set(plan.demos32k) | set(plan.traces)
    assert not set(rows) & used and not set(plan.demos32k) & set(plan.traces)
    assert set(rows) <= set(q.split_validation(len(train), 50)[0])
    assert used <= set(q.split_validation(len(train), 50)[1])  # drawn from the rest of train


def test_long_options_pick_the_best_mean_gain_over_the_best_icl_that_fits():
    from bench.options_long import pick, summarise

    def rec(best, **long):
        return {"best_icl": best, "long": long}

    datasets = {  # sink32_sum: gains -0.1, +0.1 / 0.0; sink0_mean: +0.05, -0.05 / +0.2
        "a": {"per_seed": [rec(0.5, sink32_sum=0.4, sink0_mean=0.55),
                           rec(0.5, sink32_sum=0.6, sink0_mean=0.45)]},
        "b": {"per_seed": [rec(0.3, sink32_sum=0.3, sink0_mean=0.5)]},
    }  # fmt: skip
    summary = summarise(datasets)
    assert summary["sink32_sum"]["mean_gain"] == pytest.approx(0.0)
    assert summary["sink0_mean"]["mean_gain"] == pytest.approx(0.2 / 3)
    assert summary["sink32_sum"]["sets_at_least_best_icl"] == 2  # a: mean 0.5 vs 0.5; b: tie
    assert summary["sink0_mean"]["sets_at_least_best_icl"] == 2
    assert pick(summary, ["sink32_sum", "sink0_mean"])["variant"] == "sink0_mean"
    tie = {"x": {"mean_gain": 0.1}, "y": {"mean_gain": 0.1}}
    assert pick(tie, ["y", "x"])["variant"] == "y"  # ties: the first listed
