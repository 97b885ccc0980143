"""bench.worker_gpu end to end on CPU with a tiny random Llama (the GPU run uses the 8B shape)."""

from __future__ import annotations

import json

import torch

from bench import worker_gpu
from memdb_worker.memory import Memory


def test_tiny_cpu_run_writes_every_way(tmp_path):
    out = tmp_path / "worker.json"
    result = worker_gpu.main(["--tiny", "--device", "cpu", "--concurrency", "1,2", "--out",
                              str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    assert {"device", "model", "rows"} <= saved.keys()
    rows = {(r["way"], r["concurrency"]): r for r in saved["rows"]}
    ways = ["full prefix", "memory", "memory (no k_bar)", "neither"]
    assert set(rows) == {(w, c) for w in ways for c in (1, 2)}
    for r in saved["rows"]:
        for k in ("way", "concurrency", "N", "M", "new_tokens", "tokens_per_s", "latency_s"):
            assert k in r
        assert r["tokens_per_s"] > 0 and r["latency_s"] > 0
        assert r["requests"] == r["concurrency"]
        assert r["prefills"] == 1  # the c requests were prefilled as one batch
    n = saved["settings"]["N"]
    assert rows[("full prefix", 2)]["N"] == n and rows[("full prefix", 2)]["M"] == 0
    assert rows[("full prefix", 2)]["prompt_tokens"] == n + saved["settings"]["query_tokens"]
    assert rows[("memory", 2)]["M"] == saved["settings"]["M"]
    assert rows[("neither", 1)]["N"] == 0
    # on CPU memories take the reference path, unbound rows transformers' SDPA
    assert rows[("memory", 1)]["path"] == "reference"
    assert rows[("neither", 1)]["path"] == "sdpa"


def test_synthetic_memory_loads_like_a_built_one():
    """Its metadata and tensors are what Memory.from_shards needs (as the worker's cache loads)."""
    model = worker_gpu.random_model(worker_gpu.llama_config(True), torch.device("cpu"),
                                    torch.float32)  # fmt: skip
    mem = worker_gpu.synthetic_memory(model, 8, 100)
    mem.check_model(model)
    again = Memory.from_shards(mem.to_shards())
    assert again.budget == 8 and again.prefix_length == 100
    assert again.lse_corrected  # q_mean / k_bar stored: the default decode applies the correction
    assert not worker_gpu.without_kbar(mem).lse_corrected
    assert again.model_fingerprint.startswith("sha256:")
