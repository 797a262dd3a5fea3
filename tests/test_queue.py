"""The in-memory queue (embedded mode) keeps the same contract as the Redis one."""

from __future__ import annotations

import asyncio

import pytest

from cvserve.app.errors import Overloaded
from cvserve.app.queue import Job, MemoryQueue, Reply, WorkerInfo, now_ms


def job(model: str = "m") -> Job:
    return Job(model=model, task="detection", payload=b"x", deadline_ms=now_ms() + 10_000)


def test_reply_resolves_the_waiting_request() -> None:
    async def scenario() -> None:
        q = MemoryQueue(max_queue=10, retry_after_s=1)
        fut = await q.submit(job())
        [got] = await q.fetch("m", count=4, block_ms=100)
        await q.reply(got, Reply(got.id, result={"ok": True}))
        assert (await asyncio.wait_for(fut, 1)).result == {"ok": True}
        assert await q.depth("m") == 0
    asyncio.run(scenario())


def test_fetch_waits_for_work_then_gives_up() -> None:
    async def scenario() -> None:
        q = MemoryQueue(max_queue=10, retry_after_s=1)
        assert await q.fetch("m", count=1, block_ms=50) == []
        waiter = asyncio.create_task(q.fetch("m", count=1, block_ms=2000))
        await asyncio.sleep(0.05)
        await q.submit(job())
        assert len(await asyncio.wait_for(waiter, 1)) == 1
    asyncio.run(scenario())


def test_full_queue_is_overloaded_with_retry_after() -> None:
    async def scenario() -> None:
        q = MemoryQueue(max_queue=2, retry_after_s=3)
        await q.submit(job())
        await q.submit(job())
        with pytest.raises(Overloaded) as info:
            await q.submit(job())
        assert info.value.retry_after_s == 3 and "max_queue=2" in info.value.message
        # jobs being worked on still count: the queue frees up only when they are answered
        taken = await q.fetch("m", count=2, block_ms=0)
        with pytest.raises(Overloaded):
            await q.submit(job())
        await q.reply(taken[0], Reply(taken[0].id, result={}))
        await q.submit(job())
    asyncio.run(scenario())


def test_workers_expire_without_heartbeat() -> None:
    async def scenario() -> None:
        q = MemoryQueue(max_queue=2, retry_after_s=1)
        await q.register(WorkerInfo("w1", {"m": {}}), ttl_s=0.05)
        assert [w.worker_id for w in await q.workers()] == ["w1"]
        await asyncio.sleep(0.1)
        assert await q.workers() == []
    asyncio.run(scenario())
