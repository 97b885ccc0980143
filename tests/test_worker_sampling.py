"""The one sampler (worker/memdb_worker/attend/sampling.py): greedy at temperature 0; else the
draw follows softmax(logits / T) restricted to the top-k tokens and the nucleus, renormalized
(compared with that distribution computed here from its definition); draws are a function of
(seed, step) alone; and the whole draw can be captured in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from memdb_worker.attend.sampling import sample, uniform

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7, 1.9])
N = 40_000


def exact(logits: torch.Tensor, temp: float, top_p: float, top_k: int) -> torch.Tensor:
    """The distribution the sampler should follow, token by token, from the definitions."""
    probs = torch.softmax(logits / temp, dim=-1).double()
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if rank and (mass > top_p or (top_k and rank >= top_k)):
            break
        kept.append(i)
        mass += float(probs[i])
    want = torch.zeros_like(probs)
    want[kept] = probs[kept] / probs[kept].sum()
    return want.float()


def draws(temp: float, top_p: float, top_k: int, steps: int = 0) -> torch.Tensor:
    full = lambda x, dt: torch.full((N,), x, dtype=dt)  # noqa: E731
    return sample(LOGITS.repeat(N, 1), full(temp, torch.float32), full(top_p, torch.float32),
                  full(top_k, torch.long), torch.arange(N), full(steps, torch.long))  # fmt: skip


@pytest.mark.parametrize(
    "temp,top_p,top_k",
    [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.5, 1.0, 3), (1.2, 0.9, 4), (1.0, 0.01, 0)],
)
def test_draws_follow_the_tempered_truncated_renormalized_softmax(temp, top_p, top_k):
    got = torch.bincount(draws(temp, top_p, top_k), minlength=len(LOGITS)).float() / N
    want = exact(LOGITS, temp, top_p, top_k)
    assert torch.equal(got > 0, want > 0)  # exactly the kept tokens are ever drawn
    assert (got - want).abs().max() < 0.012, (got, want)


def test_temperature_zero_is_the_argmax_whatever_the_other_settings():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(16)
    got = sample(logits, z, torch.full((16,), 0.5), torch.full((16,), 3), torch.arange(16),
                 torch.arange(16))  # fmt: skip
    assert torch.equal(got, logits.argmax(-1))


def test_a_draw_is_a_function_of_seed_and_step():
    a, b = draws(1.0, 1.0, 0, steps=3), draws(1.0, 1.0, 0, steps=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, draws(1.0, 1.0, 0, steps=4))
    u = uniform(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 1000)
    assert (u > 0).all() and (u < 1).all()
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_draw_replays_in_a_cuda_graph():
    dev = "cuda"
    logits = torch.randn(8, 1000, device=dev)
    temps, top_p = torch.full((8,), 0.9, device=dev), torch.full((8,), 0.95, device=dev)
    top_k, seeds = torch.full((8,), 50, device=dev), torch.arange(8, device=dev)
    steps = torch.zeros(8, dtype=torch.long, device=dev)
    want = sample(logits, temps, top_p, top_k, seeds, steps)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        sample(logits, temps, top_p, top_k, seeds, steps)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = sample(logits, temps, top_p, top_k, seeds, steps)
    g.replay()
    assert torch.equal(out, want)


def test_the_eager_shortcut_without_truncation_draws_what_the_full_draw_draws():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    temps = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 1.5  # some near 0
    temps[::7] = 0.0
    args = (logits, temps, torch.ones(64), torch.zeros(64, dtype=torch.long), torch.arange(64),
            torch.full((64,), 5))  # fmt: skip
    assert torch.equal(sample(*args, truncate=False), sample(*args))
