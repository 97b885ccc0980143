"""The first-order lse correction against exact attention, on a model whose RoPE has an
attention scaling a != 1 (YaRN): the corrected lse of an entry is the log-mean-Z of its members
for a shifted query, to first order."""

from __future__ import annotations

import math

import pytest
import torch

from memdb_worker.build.builder import calibrate, cluster
from memdb_worker.memory.keys import RopeSpec, apply_rope
from memdb_worker.memory.memory import correct_lse
from tests.tiny import lookup_options, tiny_llama

VOCAB = 128
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def yarn_calibration():
    model = tiny_llama(VOCAB, rope_scaling=YARN)
    g = torch.Generator().manual_seed(5)
    traces = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(6)]
    opts = lookup_options(max_records=64, lse_correction=True, seed=0, granularity="head",
                          key_dtype="float32", out_dtype="float32")  # fmt: skip
    return calibrate(model, None, list(range(3, 60)), traces, opts, progress=False)


def _exact_log_mean_z(calib, layer: int, delta: torch.Tensor) -> torch.Tensor:
    """log mean_i exp(lse_i) over every record i, each query shifted by delta [H, d] (pre-RoPE)
    and rotated at its own position: [H], exact attention on the prefix."""
    q_pre = calib.q_pre[layer].double() + delta.double()  # [N, H, d]
    cos, sin = calib.rope.cos_sin(calib.positions)  # [N, d], scaled by a
    q_post = apply_rope(q_pre, cos.double()[:, None], sin.double()[:, None])  # [N, H, d]
    lse = calib.prefix_kv.state(layer, q_post.float().transpose(0, 1).unsqueeze(0)).lse[0]  # [H, N]
    return (torch.logsumexp(lse.double(), dim=-1) - math.log(lse.shape[-1])).float()


def _corrected(calib, built, layer: int, delta: torch.Tensor) -> torch.Tensor:
    """The entry's corrected lse [H] at q_mean + delta (one entry per head: M = 1)."""
    s = built.shards[layer]
    lse = torch.from_numpy(s.lse)[:, 0]  # [H, 1] -> [I=H, h=1]
    q_mean = torch.from_numpy(s.extras["q_mean"].astype("float32"))  # [H, 1, 1, d]
    k_bar = torch.from_numpy(s.extras["k_bar"].astype("float32"))
    q = (q_mean[:, 0] + delta[:, None]).unsqueeze(0)  # [n=1, I, h, d]
    out = correct_lse(lse.unsqueeze(0).unsqueeze(2), q, q_mean.unsqueeze(0), k_bar.unsqueeze(0),
                      float(calib.prefix_kv.scaling))  # fmt: skip
    return out[0, :, 0, 0]


def test_yarn_model_has_an_attention_scaling_other_than_one(yarn_calibration):
    assert yarn_calibration.rope.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)


@pytest.mark.parametrize("layer", [0, 2])
def test_corrected_lse_is_the_members_exact_log_mean_z_for_a_shifted_query(yarn_calibration, layer):
    calib = yarn_calibration
    built = cluster(calib, 1, progress=False)  # one entry per head: every record is a member
    h, d = calib.num_heads, calib.head_dim
    # the entry's lse is the members' log-mean-Z at delta = 0 (Eq. 5)
    zero = torch.zeros(h, d)
    stored = torch.from_numpy(built.shards[layer].lse)[:, 0, 0]
    torch.testing.assert_close(stored, _exact_log_mean_z(calib, layer, zero), rtol=0, atol=1e-4)
    torch.testing.assert_close(_corrected(calib, built, layer, zero), stored)
    g = torch.Generator().manual_seed(layer)
    scale = calib.q_pre[layer].norm(dim=-1).mean(0, keepdim=True).T  # [H, 1]
    delta = torch.randn(h, d, generator=g) * scale * 0.05 / math.sqrt(d)  # |delta| ~ 5% of |q|
    # first order: the central difference of the exact lse is the correction, to O(delta^3)
    up, down = _exact_log_mean_z(calib, layer, delta), _exact_log_mean_z(calib, layer, -delta)
    exact_slope = (up - down) / 2
    slope = _corrected(calib, built, layer, delta) - stored
    assert exact_slope.abs().min() > 3e-4  # the shift moves the lse well above float32 noise
    torch.testing.assert_close(slope, exact_slope, rtol=0.02, atol=1e-5)
    # and the corrected lse is closer to the exact one than the uncorrected entry (the rest is
    # second order)
    corrected = _corrected(calib, built, layer, delta)
    assert (corrected - up).abs().sum() < 0.5 * (stored - up).abs().sum()


def test_rope_spec_reads_the_yarn_scaling_from_the_model():
    model = tiny_llama(VOCAB, rope_scaling=YARN)
    assert RopeSpec.from_model(model).attention_scaling > 1.1
