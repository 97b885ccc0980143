"""The fit of fitted rows (the format: `memdb_worker.memory.fitted`): per KV head g, M rows
(k_j, v_j, b_j) fitted to the calibration records of the group's heads (queries q_i, exact
states o_i, lse_i) by `fit_group`:

1. keys: the M prefix keys that receive the most attention mass from the calibration queries
   (sum_i softmax(s * q_i . K)), in prefix order;
   The biases and values below are fitted to these keys *as stored* (`stored`, e.g. rounded to
   float8 with their scale): a key's rounding moves every score q.k_j by q.dk_j, which for a
   model with large key components (Qwen2's key bias) is several logits; fitted on the stored
   keys, the bias and values absorb what of it is common to the queries.
2. biases: Adam on mean (lse(q_i) - lse_i)^2 (the selected keys must also carry the mass of the
   keys left out), from b = 0, on a seeded sample of the queries;
3. values: ridge least squares, argmin_V sum_i ||P_i V - o_i||^2 + lam ||V - V_sel||^2 with
   P_i = softmax(s * q_i . k + b) (closed form, normal equations accumulated in row blocks).

Knows nothing of shards, servers or models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ROW_BLOCK = 4096  # query rows per block when scoring against the prefix


def attention_mass(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Total attention each key receives from queries q [n, d] over keys [N, d]: [N]."""
    mass = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    for i in range(0, q.shape[0], ROW_BLOCK):
        mass += torch.softmax(scale * q[i : i + ROW_BLOCK] @ keys.T, dim=-1).sum(0)
    return mass


def fit_biases(
    q: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, scale: float, steps: int, lr: float
) -> torch.Tensor:
    """Biases b [M] that make logsumexp(s * q.k + b) match lse [n] (Adam from 0)."""
    bias = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    if steps == 0:
        return bias
    # the builder runs in inference mode: leave it (and copy its tensors) to differentiate
    with torch.inference_mode(False), torch.enable_grad():
        scores = (scale * q @ keys.T).clone()  # [n, M]
        lse = lse.clone()
        bias = bias.clone().requires_grad_(True)
        opt = torch.optim.Adam([bias], lr=lr)
        for _ in range(steps):
            loss = (torch.logsumexp(scores + bias, dim=-1) - lse).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return bias.detach()


def warm_solver(device: torch.device) -> None:
    """Run torch.linalg.solve once on `device` in the calling thread. Its CUDA backend is set
    up lazily on first use, and two builder threads doing that at once fail with "lazy wrapper
    should be called at most once" (three runs on an H200 died so, bench/GPU_NOTES.md)."""
    eye = torch.eye(2, dtype=torch.float64, device=device)
    torch.linalg.solve(eye, eye)


def fit_values(
    q: torch.Tensor,
    out: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    prior: torch.Tensor,
    scale: float,
    ridge: float,
) -> torch.Tensor:
    """Values V [M, d] = argmin sum_i ||P_i V - out_i||^2 + lam ||V - prior||^2, with
    P = softmax(s * q.k + b) [n, M] and lam = ridge * n / M."""
    m = keys.shape[0]
    gram = torch.zeros(m, m, dtype=torch.float64, device=keys.device)
    rhs = torch.zeros(m, out.shape[-1], dtype=torch.float64, device=keys.device)
    for i in range(0, q.shape[0], ROW_BLOCK):
        p = torch.softmax(scale * q[i : i + ROW_BLOCK] @ keys.T + bias, dim=-1)  # [rows, M]
        gram += (p.T @ p).double()  # float32 products (fast), float64 sums and solve
        rhs += (p.T @ out[i : i + ROW_BLOCK]).double()
    lam = ridge * q.shape[0] / m
    gram.diagonal().add_(lam)
    rhs += lam * prior.double()
    return torch.linalg.solve(gram, rhs).float()


def fit_group(
    keys: torch.Tensor,
    values: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    budget: int,
    scale: float,
    *,
    steps: int = 60,
    lr: float = 0.1,
    ridge: float = 1e-3,
    sample: int = 4096,
    seed: int = 0,
    stored: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fitted rows of one KV head (module doc): prefix keys/values [N, d], calibration queries
    q [n, d] (post-RoPE, every head of the group stacked) with exact out [n, d] and lse [n].
    stored maps keys [M, d] to what they read back once stored, row by row (default:
    unchanged).
    Returns keys [M, d] (as stored), values [M, d], biases [M] (float32), M = budget <= N."""
    keys, values, q = keys.float(), values.float(), q.float()
    out, lse = out.float(), lse.float()
    n_keys = keys.shape[0]
    if not 1 <= budget <= n_keys:
        raise ValueError(f"a fitted budget must be in [1, {n_keys}] (the prefix's tokens)")
    if budget == n_keys and (stored is None or torch.equal(stored(keys), keys)):
        return keys.clone(), values.clone(), torch.zeros(n_keys, device=keys.device)  # exact
    mass = attention_mass(q, keys, scale)
    sel = torch.topk(mass, budget).indices.sort().values
    k_sel = keys[sel] if stored is None else stored(keys[sel]).float()  # rows stored alone
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(q.shape[0], generator=gen)[:sample].to(q.device)
    bias = fit_biases(q[idx], lse[idx], k_sel, scale, steps, lr)
    v_sel = fit_values(q, out, k_sel, bias, values[sel], scale, ridge)
    return k_sel, v_sel, bias
