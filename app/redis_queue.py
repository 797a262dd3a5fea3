"""The Redis queue (docs/design.md §2): a stream per model, a reply stream per api process.

- jobs:     XADD {prefix}:jobs:{model}; consumer group `workers`; entries are deleted
            once acknowledged, so XLEN is the model's backlog (queued + in flight).
- payloads: inline up to `inline_payload_bytes`, else SET {prefix}:payload:{job} with a TTL.
- replies:  XADD {prefix}:replies:{api_id}; one reader task per api process resolves
            waiting requests by job id. The stream expires when its api process is gone.
- failure:  a job pending longer than the visibility timeout is reclaimed (XAUTOCLAIM) by
            a live worker; past `max_deliveries` it moves to {prefix}:dead:{model} and its
            client gets a JobFailed error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .errors import JobFailed, Overloaded
from .queue import Job, JobQueue, Reply, WorkerInfo, now_ms
from .settings import Settings

log = logging.getLogger("cvserve.queue")

GROUP = "workers"


class RedisQueue(JobQueue):
    def __init__(self, settings: Settings, consumer: str | None = None) -> None:
        super().__init__(settings.max_queue, settings.retry_after_s)
        assert settings.redis_url is not None
        self.s = settings
        self.consumer = consumer or settings.api_id
        self.redis = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                             health_check_interval=10)
        self.reply_stream = settings.key("replies", settings.api_id)
        self._reader: asyncio.Task[None] | None = None
        self._groups: set[str] = set()
        self._last_reclaim: dict[str, float] = {}

    # --- api side ----------------------------------------------------------------------
    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_replies(), name="cvserve-reply-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        await super().close()
        try:
            await self.redis.delete(self.reply_stream)
        except RedisError:
            pass
        await self.redis.aclose()

    async def _read_replies(self) -> None:
        """The one reader of this process's reply stream; resolves waiting requests."""
        last_id = "$"
        while True:
            try:
                batches = await self.redis.xread({self.reply_stream: last_id}, block=1000,
                                                 count=256)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:
                log.warning("reply reader: %s; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in batches:
                ids = []
                for entry_id, fields in entries:
                    last_id = entry_id
                    ids.append(entry_id)
                    try:
                        self._resolve(Reply.decode(fields))
                    except (KeyError, ValueError) as exc:
                        log.error("unreadable reply %s: %s", entry_id, exc)
                if ids:
                    await self.redis.xdel(self.reply_stream, *ids)

    async def submit(self, job: Job) -> asyncio.Future[Reply]:
        try:
            return await super().submit(job)
        except RedisError as exc:
            raise Overloaded(f"the queue (Redis) is unreachable: {exc}",
                             retry_after_s=self.retry_after_s) from exc

    async def _enqueue(self, job: Job) -> None:
        job.reply_to = self.reply_stream
        fields: dict[str, Any] = {"header": json.dumps(job.header())}
        if len(job.payload) <= self.s.inline_payload_bytes:
            fields["payload"] = job.payload
        else:
            payload_key = self.s.key("payload", job.id)
            await self.redis.set(payload_key, job.payload, ex=self.s.payload_ttl_s)
            fields["payload_key"] = payload_key
        # No MAXLEN: backpressure is the api's 503, jobs are never trimmed away silently.
        await self.redis.xadd(self.s.key("jobs", job.model), fields)

    async def depth(self, model: str) -> int:
        return int(await self.redis.xlen(self.s.key("jobs", model)))

    async def workers(self) -> list[WorkerInfo]:
        keys = [k async for k in self.redis.scan_iter(match=self.s.key("workers", "*"),
                                                      count=100)]
        if not keys:
            return []
        infos = []
        for raw in await self.redis.mget(keys):
            if raw is not None:
                infos.append(WorkerInfo(**json.loads(raw)))
        return infos

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    # --- worker side -------------------------------------------------------------------
    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def fetch(self, model: str, count: int, block_ms: int) -> list[Job]:
        stream = self.s.key("jobs", model)
        await self._ensure_group(stream)
        jobs = await self._reclaim(model, stream, count)
        if jobs:
            return jobs
        res = await self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count,
                                          block=block_ms or None)
        entries = res[0][1] if res else []
        return [j for entry_id, fields in entries
                if (j := await self._job(entry_id, fields, 1)) is not None]

    async def _reclaim(self, model: str, stream: str, count: int) -> list[Job]:
        """Take over jobs a dead (or stuck) worker left pending past the visibility timeout."""
        now = time.monotonic()
        if now - self._last_reclaim.get(stream, 0.0) < min(1.0, self.s.visibility_timeout_ms
                                                          / 4000):
            return []
        self._last_reclaim[stream] = now
        _next, claimed, _deleted = await self.redis.xautoclaim(
            stream, GROUP, self.consumer, min_idle_time=self.s.visibility_timeout_ms,
            start_id="0-0", count=count)
        jobs = []
        for entry_id, fields in claimed:
            if not fields:
                continue
            pending = await self.redis.xpending_range(stream, GROUP, min=entry_id,
                                                      max=entry_id, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            if deliveries > self.s.max_deliveries:
                await self._dead_letter(model, stream, entry_id, fields, deliveries)
                continue
            log.warning("reclaimed job %s of %s (delivery %d)", entry_id, model, deliveries)
            job = await self._job(entry_id, fields, deliveries)
            if job is not None:
                jobs.append(job)
        return jobs

    async def _dead_letter(self, model: str, stream: str, entry_id: bytes,
                           fields: dict[bytes, bytes], deliveries: int) -> None:
        header = json.loads(fields[b"header"])
        reason = (f"job {header['id']} was delivered {deliveries - 1} times without an answer "
                  f"(max_deliveries={self.s.max_deliveries}); it is kept in "
                  f"{self.s.key('dead', model)}")
        log.error(reason)
        await self.redis.xadd(self.s.key("dead", model),
                              {**fields, "reason": reason, "dead_ms": now_ms()})
        err = JobFailed(reason)
        await self._send(header["reply_to"], Reply(job_id=header["id"], error_code=err.code,
                                                   error_message=err.message))
        await self._ack(stream, entry_id, fields.get(b"payload_key"))

    async def _job(self, entry_id: bytes, fields: dict[bytes, bytes],
                   deliveries: int) -> Job | None:
        header = json.loads(fields[b"header"])
        payload = fields.get(b"payload")
        if payload is None:
            payload = await self.redis.get(fields[b"payload_key"])
            if payload is None:  # its TTL ran out: nobody waits for it any more
                await self._ack(self.s.key("jobs", header["model"]), entry_id, None)
                return None
        return Job(payload=payload, deliveries=deliveries, entry_id=entry_id.decode(), **header)

    async def _send(self, reply_to: str, reply: Reply) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(reply_to, reply.encode())
            pipe.expire(reply_to, self.s.reply_stream_ttl_s)
            await pipe.execute()

    async def _ack(self, stream: str, entry_id: bytes | str, payload_key: bytes | None) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            if payload_key:
                pipe.delete(payload_key)
            await pipe.execute()

    async def reply(self, job: Job, reply: Reply) -> None:
        await self._send(job.reply_to, reply)  # written first: at-least-once
        payload_key = (self.s.key("payload", job.id).encode()
                       if len(job.payload) > self.s.inline_payload_bytes else None)
        await self._ack(self.s.key("jobs", job.model), job.entry_id or "0-0", payload_key)

    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        await self.redis.set(self.s.key("workers", info.worker_id),
                             json.dumps(info.__dict__), px=int(ttl_s * 1000))

    async def unregister(self, worker_id: str) -> None:
        await self.redis.delete(self.s.key("workers", worker_id))
