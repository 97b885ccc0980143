"""memdb_client.targets: one or several server addresses as a gRPC target with round_robin
balancing and retries of idempotent calls (the cluster tests use them against real nodes)."""

from __future__ import annotations

import json

import pytest

from memdb_client.targets import IDEMPOTENT, channel_options, channel_target, service_config


def test_one_address_is_kept_as_given_and_several_become_one_static_list():
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("localhost:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"


@pytest.mark.parametrize("bad", ["a:1,b", "a:1,:2", "127.0.0.1:1,[::1]:2"])
def test_malformed_or_mixed_address_lists_are_refused(bad):
    with pytest.raises(ValueError):
        channel_target(bad)


def test_service_config_balances_round_robin_and_retries_only_idempotent_calls():
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method["name"]}
    assert ("memdb.v1.MemoryService", "Lookup") in names
    assert not {m for _, m in names} & {"PutPrefix", "DeletePrefix", "CreateTenant", "CreateApiKey"}
    assert not {m for _, m in names} & {"FetchMemory", "Watch"}  # streams: see targets.py
    assert len(names) == sum(len(m) for m in IDEMPOTENT.values())
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_tls_over_several_named_hosts_checks_the_first_name():
    assert ("grpc.ssl_target_name_override", "localhost") in channel_options(
        "localhost:1,localhost:2"
    )
    assert all(
        k != "grpc.ssl_target_name_override" for k, _ in channel_options("127.0.0.1:1,127.0.0.1:2")
    )
