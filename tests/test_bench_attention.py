"""bench.attention and its step scope end to end on CPU: tiny shapes, the Triton kernels under
Triton's interpreter, timings stubbed (the GPU run times them); every format, the shared
baselines and the rows' fields are exercised so that the device run does not fail on them."""

from __future__ import annotations

import pytest

from memdb_worker.attend import fused_kernels
from tests.interpreter import run_interpreted

_SMOKE = r"""
import torch
from bench.attention import cases as A, step as S
A.DEVICE = "cpu"
A.ACT = torch.float16  # the interpreter mishandles bf16 tensors
A.H, A.HKV, A.D, A.LIVE = 4, 2, 16, 8
S.HIDDEN, S.INTER, S.VOCAB, S.LAYERS = 32, 64, 50, 2
A.bench = lambda fn, rep=100: (fn(), 1.0)[1]  # run once, no timing
A.graphed = lambda fn: fn
results = {"rows": []}
fmts = A.FORMATS
A.check(results, fmts, m=64, n=96, batches=(1, 3))
assert all(c["ids_equal"] == 1.0 and c["rel_err_vs_torch_form"] < 1e-2 for c in results["checks"]
           if "ids_equal" in c and "bf16" not in c["memory_format"]), results
assert all(c["shared_rel_err"] < 1e-2 for c in results["checks"] if "shared_rel_err" in c)
from bench.attention import tune as T
shared = T.tune_shared(results, [1, 3], quick=True, n=96)
A.layer_rows(results, 1e12, {}, [96], [32], [1, 3], fmts, shared)
S.step_rows(results, 1e12, {}, [96], [32], [1, 3], fmts[:2], shared)
layer = [r for r in results["rows"] if r["scope"] == "layer"]
step = [r for r in results["rows"] if r["scope"] == "step"]
assert len(layer) == 2 * len(fmts) and len(step) == 2 * 2, (len(layer), len(step))
for r in layer + step:
    for key in ("memory_format", "memory_bytes", "prefix_kv_bytes", "shared_us", "memory_us"):
        assert r[key] is not None, (key, r)
by = {r["memory_format"]: r["memory_bytes"] for r in layer}
# compact formats store fewer bytes: fp8 keys < bf16 keys, one key per KV group < per head
assert by["fp8/head+kbar"] < by["bf16/head+kbar"] < by["f32/head+kbar"]
assert by["fp8/kv_group_mean+kbar"] < by["fp8/head+kbar"]
print(A.table(results["rows"], "layer"))
print("OK")
"""


@pytest.mark.skipif(not fused_kernels.HAVE_TRITON, reason="needs triton")
def test_bench_attention_runs_every_format_and_baseline_on_cpu():
    run_interpreted(_SMOKE, timeout=600)


_FITTED_SMOKE = r"""
import torch
from bench.attention import cases as A, fitted as F
from memdb_worker.attend.shared_prefix import SharedConfig
A.DEVICE = "cpu"
A.ACT = torch.float16  # the interpreter mishandles bf16 activations
A.H, A.HKV, A.D = 4, 2, 16
F.FIXED_BUDGET = 16
A.bench = lambda fn, rep=100: (fn(), 1.0)[1]  # run once, no timing
A.graphed = lambda fn: fn
results = {"rows": []}
configs = F.sweep(results, [1, 3], [4], [16], grid=[SharedConfig(block_n=16)])
F.fitted_rows_cases(results, 1e12, [64, 128], [1, 3], [4], configs)
rows = results["rows"]
assert len(rows) == 2 * 3, len(rows)  # batches x (N, M): (64, 8), (64, 16), (128, 16)
for r in rows:
    assert r["memory_format"].startswith("fitted") and r["rel_err_vs_reference"] < 3e-3, r
    for key in ("floor_us", "vs_floor", "shared_us", "shared_floor_us", "reference_us"):
        assert r[key] is not None and r[key] > 0, (key, r)
print(F.table(rows))
print("OK")
"""


@pytest.mark.skipif(not fused_kernels.HAVE_TRITON, reason="needs triton")
def test_bench_attention_fitted_rows_cases_run_on_cpu():
    run_interpreted(_FITTED_SMOKE, timeout=300)
