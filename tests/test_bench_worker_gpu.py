"""bench.worker_gpu end to end on CPU with a tiny random Llama (the GPU run uses the 8B shape):
every way, concurrency and memory format gives a row in the agreed format; the synthetic memory
loads like a built one."""

from __future__ import annotations

import json

import torch

from bench import worker_gpu
from memdb_worker.memory.memory import Memory


def test_tiny_cpu_run_writes_every_way(tmp_path):
    out = tmp_path / "worker.json"
    result = worker_gpu.main(["--tiny", "--device", "cpu", "--concurrency", "1,3", "--N", "64,128",
                              "--memory-formats",
                              "fitted/fp8,f32/head+kbar,bf16/kv_group_mean+kbar",
                              "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    assert {"device", "floor_ms", "rows"} <= saved.keys()
    keys = {(r["way"], r["c"], r["N"], r.get("memory_format")) for r in saved["rows"]}
    want = {("neither", c, 0, None) for c in (1, 3)}
    want |= {("full_prefix", c, n, None) for c in (1, 3) for n in (64, 128)}
    want |= {("memory", c, n, f) for c in (1, 3) for n in (64, 128)
             for f in ("fitted/fp8", "f32/head+kbar", "bf16/kv_group_mean+kbar")}  # fmt: skip
    assert keys == want
    for r in saved["rows"]:
        for k in ("way", "c", "N", "step_ms", "decode_tok_s", "ttft_s"):
            assert r[k] is not None, (k, r)
        assert r["step_ms"] > 0 and r["ttft_s"] > 0
        assert abs(r["decode_tok_s"] - r["c"] / (r["step_ms"] / 1e3)) < 0.01 * r["decode_tok_s"] + 1
        assert r["bucket"] == (4 if r["c"] == 3 else 1)
    fp = [r for r in saved["rows"] if r["way"] == "full_prefix"]
    assert all(r["prefix_encode_s"] > 0 and r["prefix_kv_bytes"] > 0 for r in fp)
    mem = {r["memory_format"]: r["memory_bytes"] for r in saved["rows"] if r["way"] == "memory"}
    assert mem["bf16/kv_group_mean+kbar"] < mem["f32/head+kbar"]
    # fitted rows per KV head: 1 B key + 4 B scale + 2 B x d values + 4 B bias per row
    cfg = worker_gpu.llama_config(True)
    per_row = cfg.head_dim + 4 + 2 * cfg.head_dim + 4
    assert mem["fitted/fp8"] == cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * per_row


def test_synthetic_memory_loads_like_a_built_one():
    """Its metadata and tensors are what Memory.from_shards needs (as the worker's cache loads)."""
    model = worker_gpu.random_model(worker_gpu.llama_config(True), torch.device("cpu"),
                                    torch.float32)  # fmt: skip
    mem = worker_gpu.synthetic_memory(model, 8, 100)
    mem.check_model(model)
    again = Memory.from_shards(mem.to_shards())
    assert again.budget == 8 and again.prefix_length == 100
    assert again.lse_corrected  # q_mean / k_bar stored: the default decode applies the correction
    mean = worker_gpu.synthetic_memory(model, 8, 100, "fp8/kv_group_mean")
    assert mean.key_dim == model.config.head_dim and mean.group_key == "mean"
    assert not mean.lse_corrected
    fitted = worker_gpu.synthetic_memory(model, 8, 100, "fitted/fp8")
    fitted.check_model(model)
    again = Memory.from_shards(fitted.to_shards())
    assert again.fitted and again.budget == 8 and again.prefix_length == 100
    assert again.layers[0].keys.dtype == torch.float8_e4m3fn
