"""The Redis queue (docs/design.md §2): a stream per model, a reply stream per api process.

- jobs:     XADD {prefix}:jobs:{model}; consumer group `workers`; entries are deleted
            once acknowledged, so XLEN is the model's backlog (queued + in flight).
- payloads: inline up to `inline_payload_bytes`, else SET {prefix}:payload:{job} with a TTL.
- replies:  XADD {prefix}:replies:{api_id}; one reader task per api process resolves
            waiting requests by job id. The stream expires when its api process is gone.
- leases:   a worker refreshes the idle time of the jobs it holds (XCLAIM JUSTID), so a
            busy worker keeps its jobs and only a dead one's go idle.
- records:  a detached job (POST ...?async=true) has a hash {prefix}:job:{id}, each field
            JSON: status, progress, result or error; it expires job_ttl_s after the job.
- failure:  a job idle longer than the visibility timeout is reclaimed (XAUTOCLAIM) by a
            live worker; past `max_deliveries` it moves to {prefix}:dead:{model} and its
            client gets a JobFailed error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

from .errors import JobFailed, Overloaded
from .metrics import DEAD_LETTERED, RECLAIMED, QueueStats
from .queue import Job, JobQueue, Reply, WorkerInfo, finished_record, now_ms
from .settings import Settings

log = logging.getLogger("cvserve.queue")

GROUP = "workers"
# A command with no answer in this long fails instead of hanging on a half-open connection
# (a failover, a dropped NAT entry); blocking reads wait at most MAX_BLOCK_MS, well within.
SOCKET_TIMEOUT_S = 10.0
MAX_BLOCK_MS = 5000
# Connections per process. A burst of requests takes one each to enqueue; past this many
# they wait for a free one (up to SOCKET_TIMEOUT_S). redis-py's plain pool fails at its
# cap instead ("Too many connections", 100 by default in redis-py 8), which the api
# answered as "Redis unreachable" 503s with the queue far below max_queue.
MAX_CONNECTIONS = 100

# Check the backlog and add the job in one step: checking, then adding, lets a burst of
# concurrent requests all see room and overfill the queue past max_queue.
# KEYS: the job stream; ARGV: max_queue, then the entry's field/value pairs.
# Returns {1, entry id} when added, {0, depth} when the queue is full.
_XADD_IF_ROOM = """
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then
  return {0, depth}
end
return {1, redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))}
"""

# Progress never overwrites an ended job: a late progress write (another worker's, or one
# that raced the reply) must not turn "done" back into "running".
# KEYS: the record; ARGV: status, progress, updated_ms (each JSON).
_PROGRESS_IF_RUNNING = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '"done"' or status == '"failed"' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'progress', ARGV[2], 'updated_ms', ARGV[3])
return 1
"""


@dataclass
class _Held:
    """A job this worker fetched and has not answered yet."""

    deadline_ms: int
    payload_key: bytes | None  # the separate payload key, deleted with the job


class RedisQueue(JobQueue):
    """The queue over Redis streams; one per process, as the api, a worker, or both."""

    def __init__(self, settings: Settings, consumer: str | None = None) -> None:
        super().__init__(settings.max_queue, settings.retry_after_s, settings.job_ttl_s)
        assert settings.redis_url is not None
        self.s = settings
        self.consumer = consumer or settings.api_id
        # A restarted Redis leaves every pooled connection stale: the first command on each
        # fails. Retried on a fresh connection (twice, quickly), a reply is not lost
        # to that and left for the visibility timeout. Still down: the error comes through.
        self.redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=2, socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            retry_on_error=[ConnectionError, TimeoutError]))
        self.reply_stream = settings.key("replies", settings.api_id)
        self._xadd_if_room = self.redis.register_script(_XADD_IF_ROOM)
        self._progress_if_running = self.redis.register_script(_PROGRESS_IF_RUNNING)
        self._reader: asyncio.Task[None] | None = None
        self._lease: asyncio.Task[None] | None = None
        self._groups: set[str] = set()
        self._last_reclaim: dict[str, float] = {}
        self._reclaim_cursor: dict[str, str] = {}
        self._held: dict[tuple[str, str], _Held] = {}  # (stream, entry id) -> job
        self._closing = False

    # --- api side ----------------------------------------------------------------------
    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_replies(), name="cvserve-reply-reader")

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._reader, self._lease) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a client library that turns a cancelled read into a connection
            # error must not be able to hold shutdown hostage.
            await asyncio.wait(tasks, timeout=5)
        await self._release_held()
        await super().close()
        try:
            await self.redis.delete(self.reply_stream)
        except RedisError:
            pass
        await self.redis.aclose()

    async def _read_replies(self) -> None:
        """The one reader of this process's reply stream; resolves waiting requests."""
        # From the stream's start, then from the last entry seen: "$" would skip replies
        # written between two reads or while Redis was unreachable. The stream is this
        # process's alone (api_id is unique), so nothing older is in it.
        last_id: bytes | str = "0-0"
        while not self._closing:
            try:
                batches = await self.redis.xread({self.reply_stream: last_id}, block=1000,
                                                 count=256)
                for _stream, entries in batches:
                    ids = []
                    for entry_id, fields in entries:
                        last_id = entry_id
                        ids.append(entry_id)
                        try:
                            self._resolve(Reply.decode(fields))
                        except (KeyError, TypeError, ValueError) as exc:
                            log.error("unreadable reply %s: %s", entry_id, exc)
                    if ids:
                        await self.redis.xdel(self.reply_stream, *ids)
            except RedisError as exc:  # a dead reader would leave every request to time out
                if self._closing:
                    return
                log.warning("reply reader: %s; retrying", exc)
                await asyncio.sleep(0.5)

    async def submit(self, job: Job) -> asyncio.Future[Reply]:
        try:
            return await super().submit(job)
        except RedisError as exc:
            raise Overloaded(f"the queue (Redis) is unreachable: {exc}",
                             retry_after_s=self.retry_after_s) from exc

    async def _enqueue(self, job: Job) -> None:
        job.reply_to = "" if job.detached else self.reply_stream
        fields: dict[str, Any] = {"header": json.dumps(job.header())}
        payload_key = None
        if len(job.payload) <= self.s.inline_payload_bytes:
            fields["payload"] = job.payload
        else:
            payload_key = self.s.key("payload", job.id)
            # Kept while the job may still run: a detached job can wait and run for long.
            ttl_s = max(self.s.payload_ttl_s, (job.deadline_ms - now_ms()) // 1000 + 60)
            await self.redis.set(payload_key, job.payload, ex=ttl_s)
            fields["payload_key"] = payload_key
        # No MAXLEN: backpressure is the api's 503, jobs are never trimmed away silently.
        args = [self.max_queue, *(x for pair in fields.items() for x in pair)]
        added, depth_or_id = await self._xadd_if_room(keys=[self.s.key("jobs", job.model)],
                                                      args=args)
        if not added:
            if payload_key is not None:
                await self.redis.delete(payload_key)
            raise self.overloaded(job.model, int(depth_or_id))

    async def submit_detached(self, job: Job) -> None:
        try:
            await super().submit_detached(job)
        except RedisError as exc:
            raise Overloaded(f"the queue (Redis) is unreachable: {exc}",
                             retry_after_s=self.retry_after_s) from exc

    async def record(self, job_id: str) -> dict[str, Any] | None:
        try:
            raw = await self.redis.hgetall(self.s.key("job", job_id))
        except RedisError as exc:
            raise Overloaded(f"the queue (Redis) is unreachable: {exc}",
                             retry_after_s=self.retry_after_s) from exc
        return {k.decode(): json.loads(v) for k, v in raw.items()} or None

    async def _write_record(self, job_id: str, fields: dict[str, Any], ttl_s: int) -> None:
        key = self.s.key("job", job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.expire(key, max(1, ttl_s))
            await pipe.execute()

    async def _delete_record(self, job_id: str) -> None:
        try:
            await self.redis.delete(self.s.key("job", job_id))
        except RedisError:  # it expires by itself
            pass

    async def _record_progress(self, job_id: str, done: int, total: int) -> None:
        await self._progress_if_running(
            keys=[self.s.key("job", job_id)],
            args=[json.dumps("running"), json.dumps({"done": done, "total": total}),
                  json.dumps(now_ms())])

    async def depth(self, model: str) -> int:
        return int(await self.redis.xlen(self.s.key("jobs", model)))

    async def stats(self, models: list[str]) -> dict[str, QueueStats]:
        """Entries are deleted once answered, so a job stream's length is its backlog and
        its first entry id (milliseconds since the epoch) the oldest job's arrival."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.xlen(self.s.key("jobs", model))
                pipe.xrange(self.s.key("jobs", model), count=1)
                pipe.xlen(self.s.key("dead", model))
            found = await pipe.execute()
        out = {}
        for i, model in enumerate(models):
            depth, first, dead = found[3 * i: 3 * i + 3]
            oldest = None
            if first:
                arrived_ms = int(first[0][0].split(b"-")[0])
                oldest = max(0.0, (now_ms() - arrived_ms) / 1000)
            out[model] = QueueStats(int(depth), oldest, int(dead), workers=0)
        return out

    async def workers(self) -> list[WorkerInfo]:
        try:
            keys = [k async for k in self.redis.scan_iter(match=self.s.key("workers", "*"),
                                                          count=100)]
            raws = await self.redis.mget(keys) if keys else []
        except RedisError as exc:  # a 503 the client may retry, not a 500
            raise Overloaded(f"the queue (Redis) is unreachable: {exc}",
                             retry_after_s=self.retry_after_s) from exc
        return [WorkerInfo(**json.loads(raw)) for raw in raws if raw is not None]

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
            # id=0: jobs submitted before any worker existed are served too.
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def fetch(self, model: str, count: int, block_ms: int) -> list[Job]:
        if self._lease is None:
            self._lease = asyncio.create_task(self._keep_leases(), name="cvserve-leases")
        stream = self.s.key("jobs", model)
        try:
            return await self._fetch(model, stream, count, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream and its group are gone (Redis restarted without persistence, or
            # the key was deleted): the cached "group exists" is stale, so recreate it.
            log.warning("consumer group of %s vanished; recreating it", stream)
            self._groups.discard(stream)
            return await self._fetch(model, stream, count, block_ms)

    async def _fetch(self, model: str, stream: str, count: int, block_ms: int) -> list[Job]:
        await self._ensure_group(stream)
        jobs = await self._reclaim(model, stream, count)
        if jobs:
            return jobs
        res = await self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count,
                                          block=min(block_ms, MAX_BLOCK_MS) or None)
        entries = res[0][1] if res else []
        return [j for entry_id, fields in entries
                if (j := await self._job(stream, entry_id, fields, 1)) is not None]

    async def _reclaim(self, model: str, stream: str, count: int) -> list[Job]:
        """Take over jobs a dead worker left pending past the visibility timeout."""
        now = time.monotonic()
        if now - self._last_reclaim.get(stream, 0.0) < min(1.0, self.s.visibility_timeout_ms
                                                          / 4000):
            return []
        self._last_reclaim[stream] = now
        # XAUTOCLAIM looks at a bounded window of the pending list per call; resuming from
        # the returned cursor reaches idle jobs behind many live ones.
        res = await self.redis.xautoclaim(
            stream, GROUP, self.consumer, min_idle_time=self.s.visibility_timeout_ms,
            start_id=self._reclaim_cursor.get(stream, "0-0"), count=count)
        # [cursor, entries] on Redis 6.2, [cursor, entries, deleted ids] on 7+.
        cursor, claimed = res[0], res[1]
        self._reclaim_cursor[stream] = cursor.decode() if isinstance(cursor, bytes) else cursor
        jobs = []
        for entry_id, fields in claimed:
            if not fields:  # deleted from the stream while pending (Redis 6.2)
                continue
            pending = await self.redis.xpending_range(stream, GROUP, min=entry_id,
                                                      max=entry_id, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            if deliveries > self.s.max_deliveries:
                await self._dead_letter(model, stream, entry_id, fields, deliveries)
                DEAD_LETTERED.labels(model).inc()
                continue
            RECLAIMED.labels(model).inc()
            log.warning("reclaimed job %s of %s (delivery %d)", entry_id.decode(), model,
                        deliveries)
            job = await self._job(stream, entry_id, fields, deliveries)
            if job is not None:
                jobs.append(job)
        return jobs

    async def _keep_leases(self) -> None:
        """Refresh the idle time of the jobs this worker holds (decoding, waiting for a
        batch, running), so that a busy worker's jobs are not reclaimed and run twice."""
        while not self._closing:
            await asyncio.sleep(self.s.visibility_timeout_ms / 3000)
            now = now_ms()
            by_stream: dict[str, list[str]] = {}
            for (stream, entry_id), held in self._held.items():
                # Past its deadline nobody waits for it: let another worker reclaim it and
                # answer "expired", so that a wedged worker cannot keep it forever.
                if held.deadline_ms > now:
                    by_stream.setdefault(stream, []).append(entry_id)
            for stream, ids in by_stream.items():
                try:
                    # JUSTID: the idle time resets without counting a delivery.
                    await self.redis.xclaim(stream, GROUP, self.consumer, 0, ids, justid=True)
                except RedisError as exc:
                    log.warning("could not refresh %d job leases on %s: %s", len(ids), stream,
                                exc)

    async def _release_held(self) -> None:
        """On a clean stop, mark unanswered jobs idle so that others reclaim them at once
        rather than after the visibility timeout."""
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in self._held:
            by_stream.setdefault(stream, []).append(entry_id)
        self._held.clear()
        for stream, ids in by_stream.items():
            try:
                await self.redis.xclaim(stream, GROUP, self.consumer, 0, ids,
                                        idle=self.s.visibility_timeout_ms, justid=True)
                log.info("released %d unanswered jobs of %s to other workers", len(ids),
                         stream)
            except RedisError as exc:  # they are reclaimed after the visibility timeout
                log.warning("could not release jobs of %s: %s", stream, exc)

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
        reply = Reply(job_id=header["id"], error_code=err.code, error_message=err.message)
        if header.get("detached"):
            await self._write_record(header["id"], finished_record(reply), self.job_ttl_s)
        else:
            await self._send(header["reply_to"], reply)
        await self._ack(stream, entry_id, fields.get(b"payload_key"))

    async def _job(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes],
                   deliveries: int) -> Job | None:
        header = json.loads(fields[b"header"])
        payload = fields.get(b"payload")
        payload_key = fields.get(b"payload_key")
        if payload is None:
            payload = await self.redis.get(payload_key) if payload_key else None
            if payload is None:  # its TTL ran out: nobody waits for it any more
                await self._ack(stream, entry_id, None)
                return None
        job = Job(payload=payload, deliveries=deliveries, entry_id=entry_id.decode(), **header)
        self._held[(stream, job.entry_id)] = _Held(job.deadline_ms, payload_key)
        return job

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
        stream = self.s.key("jobs", job.model)
        entry_id = job.entry_id or "0-0"
        # Written first: at-least-once.
        if job.detached:
            await self._write_record(job.id, finished_record(reply), self.job_ttl_s)
        else:
            await self._send(job.reply_to, reply)
        # The payload key as the entry named it: the api's inline limit may differ from ours.
        held = self._held.pop((stream, entry_id), None)
        await self._ack(stream, entry_id, held.payload_key if held else None)

    async def cancel(self, job: Job) -> None:
        """A marker the worker checks before it runs a batch, gone by the job's deadline."""
        ttl_ms = max(1000, job.deadline_ms - now_ms())
        await self.redis.set(self.s.key("cancel", job.id), b"1", px=ttl_ms)

    async def cancelled(self, jobs: list[Job]) -> set[str]:
        if not jobs:
            return set()
        keys = [self.s.key("cancel", job.id) for job in jobs]
        if not await self.redis.exists(*keys):  # the usual case: one round trip
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            found = await pipe.execute()
        return {job.id for job, hit in zip(jobs, found, strict=True) if hit}

    async def drop(self, job: Job) -> None:
        stream = self.s.key("jobs", job.model)
        entry_id = job.entry_id or "0-0"
        held = self._held.pop((stream, entry_id), None)
        await self._ack(stream, entry_id, held.payload_key if held else None)

    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        await self.redis.set(self.s.key("workers", info.worker_id),
                             json.dumps(info.__dict__), px=int(ttl_s * 1000))

    async def unregister(self, worker_id: str) -> None:
        await self.redis.delete(self.s.key("workers", worker_id))
