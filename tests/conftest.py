"""Shared model fixtures. Tests that use `smollm2` must carry the `model` marker."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (GGUF, CPU, float32) and its tokenizer, loaded once per session."""
    torch = pytest.importorskip("torch")
    from memdb_worker.model import load_model

    torch.manual_seed(0)
    try:
        loaded = load_model("default", device="cpu", dtype=torch.float32)
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")
    return loaded
