"""Shared model fixtures. Tests that use `smollm2` must carry the `model` marker."""

from __future__ import annotations

import os

import pytest

# Idle OpenMP threads (torch, FAISS) sleep instead of spinning: test processes and the server
# processes they start share 2 cores, and spinning threads slowed builds 15-60x there.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (GGUF, CPU, float32) and its tokenizer, loaded once per session."""
    torch = pytest.importorskip("torch")
    from memdb_worker.model import load_model

    torch.manual_seed(0)
    # no skip: scripts/setup.sh installs the model package, so a missing model is a failure
    return load_model("default", device="cpu", dtype=torch.float32)
