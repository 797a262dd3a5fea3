"""The Redis queue protocol (docs/design.md §2) against a real Redis, one key prefix per test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from cvserve.app.errors import Overloaded
from cvserve.app.queue import Job, Reply, WorkerInfo, now_ms
from cvserve.app.redis_queue import GROUP, RedisQueue
from cvserve.app.settings import Settings

from .conftest import free_port

pytestmark = pytest.mark.anyio

MODEL = "frcnn"
# Small enough that reclaim tests take about a second; the smallest Settings allows.
VISIBILITY_MS = 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to look at the keys the queue writes."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class Queues:
    """Opens RedisQueues under this test's prefix and closes whatever is left open."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.open_queues: list[RedisQueue] = []

    def settings(self, **overrides: Any) -> Settings:
        return Settings(**{"redis_url": self.redis_url, "key_prefix": self.prefix,
                           "visibility_timeout_ms": VISIBILITY_MS, **overrides})

    async def api(self, **overrides: Any) -> RedisQueue:
        queue = RedisQueue(self.settings(**overrides))
        await queue.start()
        self.open_queues.append(queue)
        return queue

    def worker(self, consumer: str, **overrides: Any) -> RedisQueue:
        queue = RedisQueue(self.settings(**overrides), consumer=consumer)
        self.open_queues.append(queue)
        return queue

    async def close(self, queue: RedisQueue) -> None:
        self.open_queues.remove(queue)
        await queue.close()

    def stream(self, kind: str = "jobs") -> str:
        return f"{self.prefix}:{kind}:{MODEL}"


@pytest.fixture
async def queues(redis_url: str, redis_prefix: str) -> AsyncIterator[Queues]:
    q = Queues(redis_url, redis_prefix)
    yield q
    for queue in list(q.open_queues):
        await q.close(queue)


def new_job(payload: bytes = b"\xff\xd8 a jpeg", timeout_s: float = 30.0) -> Job:
    return Job(model=MODEL, task="detection", payload=payload,
               deadline_ms=now_ms() + int(timeout_s * 1000), params={"score_threshold": 0.25})


async def fetch_until(queue: RedisQueue, timeout_s: float, count: int = 8) -> list[Job]:
    """Fetch like a worker's intake loop until something comes or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if jobs := await queue.fetch(MODEL, count, block_ms=100):
            return jobs
    return []


# A worker process that takes jobs and dies without answering: no reply, no ack, no close.
CRASHING_WORKER = """
import asyncio, os, sys
from cvserve.app.redis_queue import RedisQueue
from cvserve.app.settings import Settings

async def main() -> None:
    queue = RedisQueue(Settings(), consumer="crashed-worker")
    jobs = await queue.fetch(sys.argv[1], 8, block_ms=5000)
    print(" ".join(job.id for job in jobs), flush=True)
    os._exit(0)

asyncio.run(main())
"""


async def crash_holding_jobs(q: Queues) -> list[str]:
    """Run a worker process that fetches jobs and dies; the ids of the jobs it held."""
    env = {**os.environ, "CVSERVE_REDIS_URL": q.redis_url, "CVSERVE_KEY_PREFIX": q.prefix}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CRASHING_WORKER, MODEL], env=env,
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


# --- the happy path ----------------------------------------------------------------------
async def test_submitted_job_reaches_a_worker_and_its_reply_resolves_the_request(
        queues: Queues) -> None:
    api, worker = await queues.api(), queues.worker("w1")
    job = new_job()
    future = await api.submit(job)

    [got] = await worker.fetch(MODEL, 8, block_ms=2000)
    assert (got.id, got.task, got.payload, got.params) == (
        job.id, "detection", job.payload, {"score_threshold": 0.25})
    assert got.deliveries == 1 and got.reply_to == api.reply_stream

    await worker.reply(got, Reply(got.id, result={"detections": []}, body=b"png bytes"))
    reply = await asyncio.wait_for(future, 5)
    assert reply.ok and reply.result == {"detections": []} and reply.body == b"png bytes"


async def test_job_counts_in_depth_until_its_reply_is_written_then_is_acked_and_deleted(
        queues: Queues, r: redis.Redis) -> None:
    api, worker = await queues.api(), queues.worker("w1")
    future = await api.submit(new_job())
    [got] = await worker.fetch(MODEL, 8, block_ms=2000)
    assert await api.depth(MODEL) == 1, "a job in flight still counts against max_queue"
    assert r.xpending(queues.stream(), GROUP)["pending"] == 1

    await worker.reply(got, Reply(got.id, result={}))
    await asyncio.wait_for(future, 5)
    assert r.xlen(queues.stream()) == 0 and await api.depth(MODEL) == 0
    assert r.xpending(queues.stream(), GROUP)["pending"] == 0


async def test_reply_written_before_the_reader_starts_is_not_lost(queues: Queues) -> None:
    # The reader must not start at "$": a reply written while it was reconnecting (or
    # between two reads) would be skipped and its request would wait for its deadline.
    api = RedisQueue(queues.settings())
    queues.open_queues.append(api)
    worker = queues.worker("w1")
    future = await api.submit(new_job())
    [got] = await worker.fetch(MODEL, 8, block_ms=2000)
    await worker.reply(got, Reply(got.id, result={"n": 1}))

    await api.start()
    assert (await asyncio.wait_for(future, 5)).result == {"n": 1}


# --- payloads ----------------------------------------------------------------------------
async def test_large_payload_travels_in_its_own_key_with_a_ttl_and_is_deleted_after_reply(
        queues: Queues, r: redis.Redis) -> None:
    api = await queues.api(inline_payload_bytes=1024, payload_ttl_s=120)
    # A worker configured with a different inline limit still finds and deletes the key.
    worker = queues.worker("w1", inline_payload_bytes=1_000_000)
    job = new_job(payload=os.urandom(4096))
    future = await api.submit(job)

    key = f"{queues.prefix}:payload:{job.id}"
    assert r.get(key) == job.payload
    assert 0 < r.ttl(key) <= 120
    [(_id, fields)] = r.xrange(queues.stream())
    assert b"payload" not in fields and fields[b"payload_key"] == key.encode()

    [got] = await worker.fetch(MODEL, 8, block_ms=2000)
    assert got.payload == job.payload
    await worker.reply(got, Reply(got.id, result={}))
    await asyncio.wait_for(future, 5)
    assert not r.exists(key)


async def test_small_payload_travels_inline(queues: Queues, r: redis.Redis) -> None:
    api = await queues.api(inline_payload_bytes=1024)
    job = new_job(payload=b"x" * 1024)
    await api.submit(job)
    [(_id, fields)] = r.xrange(queues.stream())
    assert fields[b"payload"] == job.payload
    assert not r.exists(f"{queues.prefix}:payload:{job.id}")


# --- failures: reclaim, leases, dead letters ---------------------------------------------
async def test_job_of_a_crashed_worker_is_reclaimed_after_the_visibility_timeout(
        queues: Queues, r: redis.Redis) -> None:
    api, survivor = await queues.api(), queues.worker("survivor")
    job = new_job()
    future = await api.submit(job)
    assert await crash_holding_jobs(queues) == [job.id]
    crashed_at = time.monotonic()

    [got] = await fetch_until(survivor, timeout_s=5)
    assert time.monotonic() - crashed_at >= VISIBILITY_MS / 1000 - 0.05
    assert got.id == job.id and got.deliveries == 2 and got.payload == job.payload
    [pending] = r.xpending_range(queues.stream(), GROUP, "-", "+", 1)
    assert pending["consumer"] == b"survivor"

    await survivor.reply(got, Reply(got.id, result={"ok": True}))
    assert (await asyncio.wait_for(future, 5)).result == {"ok": True}
    assert r.xlen(queues.stream()) == 0


async def test_job_past_max_deliveries_is_dead_lettered_and_its_request_fails_clearly(
        queues: Queues, r: redis.Redis) -> None:
    api = await queues.api()
    survivor = queues.worker("survivor", max_deliveries=1)
    job = new_job()
    future = await api.submit(job)
    assert await crash_holding_jobs(queues) == [job.id]

    # Its second delivery is past max_deliveries=1: the survivor never runs it.
    assert await fetch_until(survivor, timeout_s=VISIBILITY_MS / 1000 + 1.5) == []
    reply = await asyncio.wait_for(future, 5)
    assert reply.error_code == "job_failed"
    assert "max_deliveries=1" in (reply.error_message or "")
    [(_id, fields)] = r.xrange(queues.stream("dead"))
    assert fields[b"payload"] == job.payload and b"max_deliveries=1" in fields[b"reason"]
    assert r.xlen(queues.stream()) == 0, "a dead job no longer counts against max_queue"


async def test_busy_worker_keeps_its_jobs_past_the_visibility_timeout(
        queues: Queues, r: redis.Redis) -> None:
    # A live worker slow to answer (a long batch, a busy CPU) must not have its jobs
    # reclaimed and run a second time; only a dead worker's jobs go idle.
    api, busy, other = await queues.api(), queues.worker("busy"), queues.worker("other")
    future = await api.submit(new_job())
    [got] = await busy.fetch(MODEL, 8, block_ms=2000)

    assert await fetch_until(other, timeout_s=2.5 * VISIBILITY_MS / 1000) == []
    [pending] = r.xpending_range(queues.stream(), GROUP, "-", "+", 1)
    assert pending["consumer"] == b"busy" and pending["times_delivered"] == 1
    assert pending["time_since_delivered"] < VISIBILITY_MS

    await busy.reply(got, Reply(got.id, result={}))
    assert (await asyncio.wait_for(future, 5)).ok


async def test_job_held_past_its_deadline_goes_to_a_worker_that_answers_expired(
        queues: Queues) -> None:
    # A wedged worker cannot keep a job forever: once nobody waits for it, it is released.
    api, wedged, other = await queues.api(), queues.worker("wedged"), queues.worker("other")
    await api.submit(new_job(timeout_s=0.2))
    [held] = await wedged.fetch(MODEL, 8, block_ms=2000)

    [got] = await fetch_until(other, timeout_s=VISIBILITY_MS / 1000 + 2)
    assert got.id == held.id and got.expired and got.deliveries == 2


async def test_stopping_worker_hands_its_unanswered_jobs_over_at_once(
        queues: Queues) -> None:
    api, stopping, other = await queues.api(), queues.worker("stopping"), queues.worker("other")
    job = new_job()
    future = await api.submit(job)
    await stopping.fetch(MODEL, 8, block_ms=2000)
    await queues.close(stopping)
    stopped_at = time.monotonic()

    [got] = await fetch_until(other, timeout_s=VISIBILITY_MS / 1000)
    assert time.monotonic() - stopped_at < VISIBILITY_MS / 1000, "no visibility wait"
    assert got.id == job.id and got.deliveries == 2
    await other.reply(got, Reply(got.id, result={}))
    assert (await asyncio.wait_for(future, 5)).ok


async def test_worker_recreates_its_group_when_the_job_stream_vanishes(
        queues: Queues, r: redis.Redis) -> None:
    # e.g. Redis restarted without persistence: the worker's cached group is stale.
    api, worker = await queues.api(), queues.worker("w1")
    assert await worker.fetch(MODEL, 8, block_ms=10) == []
    r.delete(queues.stream())
    job = new_job()
    await api.submit(job)  # recreates the stream, without a group
    [got] = await worker.fetch(MODEL, 8, block_ms=2000)
    assert got.id == job.id


# --- backpressure, registration, an unreachable Redis ------------------------------------
async def test_full_queue_refuses_submit_with_retry_after(
        queues: Queues, r: redis.Redis) -> None:
    api = await queues.api(max_queue=2, retry_after_s=3)
    await api.submit(new_job())
    await api.submit(new_job())
    with pytest.raises(Overloaded) as refused:
        await api.submit(new_job())
    assert refused.value.retry_after_s == 3 and "max_queue=2" in refused.value.message
    assert r.xlen(queues.stream()) == 2, "a refused job is not enqueued"


async def test_burst_of_submits_never_overfills_the_queue(
        queues: Queues, r: redis.Redis) -> None:
    # Many requests at once all see an empty queue; only max_queue of them may get in.
    api = await queues.api(max_queue=2, inline_payload_bytes=16)
    outcomes = await asyncio.gather(*(api.submit(new_job(payload=b"x" * 64))
                                      for _ in range(10)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert len(refused) == 8 and all("max_queue=2" in o.message for o in refused)
    assert r.xlen(queues.stream()) == 2
    assert len(list(r.scan_iter(f"{queues.prefix}:payload:*"))) == 2, "refused payloads go"


async def test_worker_registration_is_listed_until_its_ttl_passes(queues: Queues) -> None:
    api, worker = await queues.api(), queues.worker("w1")
    meta = {"name": MODEL, "task": "detection"}
    await worker.register(WorkerInfo("w1", {MODEL: meta}), ttl_s=0.5)
    [info] = await api.workers()
    assert info.worker_id == "w1" and info.models == {MODEL: meta}

    await asyncio.sleep(0.7)  # no heartbeat refreshed it
    assert await api.workers() == []


async def test_unregistered_worker_disappears_at_once(queues: Queues) -> None:
    api, worker = await queues.api(), queues.worker("w1")
    await worker.register(WorkerInfo("w1", {}), ttl_s=30)
    await worker.unregister("w1")
    assert await api.workers() == []


async def test_unreachable_redis_is_overloaded_not_a_crash(redis_prefix: str) -> None:
    # free_port(): nothing listens there once its probe socket is closed.
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        key_prefix=redis_prefix)
    api = RedisQueue(settings)
    await api.start()
    try:
        assert await api.ping() is False
        with pytest.raises(Overloaded, match="unreachable"):
            await api.submit(new_job())
        with pytest.raises(Overloaded, match="unreachable"):
            await api.workers()
    finally:
        await api.close()
