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
    from memdb_worker.model.loading import load_model

    torch.manual_seed(0)
    # no skip: scripts/setup.sh installs the model package, so a missing model is a failure
    return load_model("default", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def cluster_planes(tmp_path_factory):
    """A real 3-member etcd cluster and a 3-master + 3-replica Redis Cluster on 127.0.0.1,
    started once per session (tests isolate themselves under their own etcd root)."""
    from memdb_server.cluster_process import control_and_data_planes

    with control_and_data_planes(tmp_path_factory.mktemp("cluster")) as planes:
        yield planes
