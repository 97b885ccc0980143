"""memdb_server.shares.TimeShares on a simulated clock: a tenant alone is never held back; under
contention a tenant's job time per second converges to its share; a debt run up alone is
forgiven; idle tenants are forgotten."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from memdb_server.shares import TimeShares

TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")


class Clock:
    """Simulated time: `sleep` advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        await asyncio.sleep(0)  # let other waiting jobs look again


def shares(
    clock: Clock, share: float = 0.25, burst_s: float = 0.05, window_s: float = 1.0
) -> TimeShares:
    return TimeShares(share, burst_s, window_s, TENANT.get, clock=clock, sleep=clock.sleep)


async def job(s: TimeShares, clock: Clock, tenant: str, seconds: float) -> None:
    TENANT.set(tenant)
    async with s.hold():
        clock.now += seconds  # the job's work


def test_a_tenant_alone_is_never_held_back():
    clock = Clock()
    s = shares(clock)

    async def main() -> None:
        for _ in range(100):
            await job(s, clock, "a", 0.2)  # 20 s of work, 80x its share's worth

    asyncio.run(main())
    assert clock.slept == 0.0 and s.waits == 0
    assert clock.now == pytest.approx(20.0)


def test_under_contention_a_tenants_time_converges_to_its_share():
    clock = Clock()
    s = shares(clock, share=0.25)
    used = 0.0

    async def main() -> None:
        nonlocal used
        while clock.now < 100.0:
            await job(s, clock, "victim", 0.001)  # active: a job at least every window
            await job(s, clock, "noisy", 0.05)
            used += 0.05

    asyncio.run(main())
    victim_time = 0.001 * (used / 0.05)
    rate = used / (clock.now - victim_time)
    assert rate == pytest.approx(0.25, rel=0.05), rate  # exact computation: share x elapsed
    assert s.waits > 0


def test_the_victims_jobs_do_not_wait_for_the_noisy_tenants_debt():
    clock = Clock()
    s = shares(clock, window_s=100.0)  # the victim stays active throughout

    async def main() -> None:
        await job(s, clock, "victim", 0.001)
        await job(s, clock, "noisy", 2.0)  # one long job: the noisy tenant owes ~1.95 s
        before = clock.slept
        await job(s, clock, "victim", 0.001)
        assert clock.slept == before  # the victim is within its share
        await job(s, clock, "noisy", 0.01)  # now waits until its bucket is back above 0

    asyncio.run(main())
    # the noisy tenant waited for its debt (2 s less its burst and the refill meanwhile) at
    # 0.25 s/s
    assert clock.slept == pytest.approx((2.0 - 0.05 - 0.001 * 0.25) / 0.25, rel=0.001)


def test_a_tenant_waits_no_longer_than_the_others_are_active():
    clock = Clock()
    s = shares(clock, window_s=1.0)

    async def main() -> None:
        await job(s, clock, "victim", 0.001)
        await job(s, clock, "noisy", 0.5)  # owes ~0.45 s: 1.8 s at its share
        await job(s, clock, "noisy", 0.01)

    asyncio.run(main())
    # the victim, last seen at 0.001 s, is idle from 1.001 s: the noisy tenant waits from
    # 0.501 s until then, not 1.8 s
    assert clock.slept == pytest.approx(0.5, abs=0.001)


def test_a_debt_run_up_alone_is_forgiven():
    clock = Clock()
    s = shares(clock)

    async def main() -> None:
        for _ in range(10):
            await job(s, clock, "noisy", 1.0)  # alone: 10 s of work, no wait
        clock.now += 0.5
        await job(s, clock, "victim", 0.001)  # another tenant arrives
        await job(s, clock, "noisy", 0.01)

    asyncio.run(main())
    # only the last solo job (1 s, less 0.5 s of refill at 0.25 s/s) is paid for, not all 10
    assert 0 < clock.slept < 1.0 / 0.25


def test_a_tenants_waiting_jobs_start_first_in_first_out_one_at_a_time():
    clock = Clock()
    s = shares(clock, window_s=100.0)  # the victim stays active throughout
    started: list[int] = []
    running = 0
    most = 0

    async def numbered(i: int) -> None:
        nonlocal running, most
        TENANT.set("noisy")
        async with s.hold():
            started.append(i)
            running += 1
            most = max(most, running)
            await clock.sleep(0.05)  # the job's work, while the others look again
            running -= 1

    async def main() -> None:
        await job(s, clock, "victim", 0.001)
        await job(s, clock, "noisy", 0.5)  # in debt: the next jobs must wait
        await asyncio.gather(*(numbered(i) for i in range(6)))

    asyncio.run(main())
    assert started == list(range(6))
    assert most == 1  # over its share, the tenant runs one job at a time


def test_what_a_job_costs_after_it_is_charged_to_its_tenant():
    clock = Clock()
    s = shares(clock, share=0.25, burst_s=0.05, window_s=100.0)

    async def main() -> None:
        await job(s, clock, "victim", 0.001)
        TENANT.set("noisy")
        async with s.hold():
            clock.now += 0.01  # the job
        charge = s.charge_from_now()
        clock.now += 0.3  # its answer is sent
        charge()
        before = clock.slept
        await job(s, clock, "noisy", 0.01)
        return clock.slept - before

    waited = asyncio.run(main())
    # bucket: 0.05 - 0.01 (job), refilled to the 0.05 burst while sending, less 0.3 for the
    # sending: -0.25, paid back at 0.25 s/s (without the charge: no wait)
    assert waited == pytest.approx(0.25 / 0.25, rel=0.01)


def test_the_lightest_tenant_is_never_held_back_even_over_its_share():
    clock = Clock()
    s = shares(clock, share=0.01, burst_s=0.001, window_s=1.0)  # 10 ms of work per second
    victim_slept = 0.0

    async def main() -> None:
        nonlocal victim_slept
        while clock.now < 5.0:
            await job(s, clock, "noisy", 0.02)  # the heavier: held to its share
            for _ in range(5):
                before = clock.slept
                await job(s, clock, "victim", 0.002)  # 10x its share, but the lighter
                victim_slept += clock.slept - before

    asyncio.run(main())
    assert s._buckets["victim"].tokens < 0  # far over its share: only lightness lets it run
    assert victim_slept == 0.0
    assert clock.slept > 0  # the noisy tenant was held


def test_another_tenants_occasional_call_holds_a_heavy_tenant_back_for_a_window():
    clock = Clock()
    s = shares(clock, share=0.01, burst_s=0.001, window_s=0.1)
    worked = 0.0

    async def main() -> None:
        nonlocal worked
        next_call = 0.0
        while clock.now < 20.0:
            if clock.now >= next_call:  # the other tenant: one small call every 5 s
                await job(s, clock, "other", 0.001)
                next_call += 5.0
            await job(s, clock, "heavy", 0.05)
            worked += 0.05

    asyncio.run(main())
    # held only while `other` counts as active (window_s = 0.1 s after each of its 4 calls)
    assert worked / clock.now > 0.95
    assert clock.slept == pytest.approx(4 * 0.1, abs=0.1)


def test_idle_tenants_are_forgotten():
    clock = Clock()
    s = shares(clock)

    async def main() -> None:
        for i in range(50):
            await job(s, clock, f"t{i}", 0.001)
            clock.now += 1.0

    asyncio.run(main())
    assert len(s._buckets) <= 12  # those seen in the last 10 windows (+ the current one)


def test_shares_must_be_positive():
    with pytest.raises(ValueError, match="share must be > 0"):
        TimeShares(0, 0.05, 1.0, TENANT.get)
