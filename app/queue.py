"""The queue between api and worker: job and reply types, the interface, the in-memory queue.

Both sides speak only this interface, so embedded mode (api + worker in one process,
`MemoryQueue`) and the distributed mode (`RedisQueue` in redis_queue.py) behave alike.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import Overloaded
from .metrics import QueueStats


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Job:
    """One request's work: what to run, on what, by when, and where the answer goes."""

    model: str
    task: str
    payload: bytes
    deadline_ms: int
    params: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reply_to: str = ""
    request_id: str = ""  # the client's X-Request-ID, for logs
    enqueued_ms: int = field(default_factory=now_ms)
    # Nobody waits on the answer: it is kept as a job record (GET /jobs/{id}) instead.
    detached: bool = False
    deliveries: int = 1
    entry_id: str | None = None  # the transport's handle (a Redis stream entry id)

    @property
    def expired(self) -> bool:
        return now_ms() > self.deadline_ms

    def header(self) -> dict[str, Any]:
        """Everything but the payload, as JSON-able fields."""
        return {"id": self.id, "model": self.model, "task": self.task, "params": self.params,
                "deadline_ms": self.deadline_ms, "reply_to": self.reply_to,
                "request_id": self.request_id, "enqueued_ms": self.enqueued_ms,
                "detached": self.detached}


@dataclass
class Reply:
    """A job's outcome: a JSON result (and optional binary body, e.g. a PNG) or an error."""

    job_id: str
    result: dict[str, Any] | None = None
    body: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    def encode(self) -> dict[str, bytes]:
        meta = {"job_id": self.job_id, "result": self.result, "error_code": self.error_code,
                "error_message": self.error_message}
        fields = {"meta": json.dumps(meta).encode()}
        if self.body is not None:
            fields["body"] = self.body
        return fields

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> Reply:
        meta = json.loads(fields[b"meta"])
        return cls(body=fields.get(b"body"), **meta)


def job_record(job: Job) -> dict[str, Any]:
    """A detached job's record as first written: queued, no progress yet."""
    return {"id": job.id, "model": job.model, "task": job.task, "status": "queued",
            "created_ms": job.enqueued_ms, "updated_ms": job.enqueued_ms,
            "deadline_ms": job.deadline_ms, "progress": {"done": 0, "total": None}}


def finished_record(reply: Reply) -> dict[str, Any]:
    """The fields a detached job's reply sets in its record."""
    if reply.ok:
        return {"status": "done", "result": reply.result, "updated_ms": now_ms()}
    return {"status": "failed", "updated_ms": now_ms(),
            "error": {"code": reply.error_code, "message": reply.error_message}}


@dataclass
class WorkerInfo:
    """What a live worker announces: who it is and the models it serves (with metadata)."""

    worker_id: str
    models: dict[str, dict[str, Any]]
    started_ms: int = field(default_factory=now_ms)


class JobQueue(ABC):
    """The queue contract (docs/design.md §2). The api submits and awaits; workers fetch and
    reply. A reply is written before its job is acknowledged (at-least-once)."""

    def __init__(self, max_queue: int, retry_after_s: int, job_ttl_s: int = 3600) -> None:
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.job_ttl_s = job_ttl_s  # how long a detached job's record outlives the job
        self._waiting: dict[str, asyncio.Future[Reply]] = {}

    # --- api side ----------------------------------------------------------------------
    async def start(self) -> None:  # noqa: B027 - optional hook, a no-op in memory
        """Open connections and start the reply reader (api side)."""

    async def close(self) -> None:
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()

    async def submit(self, job: Job) -> asyncio.Future[Reply]:
        """Enqueue a job; the future resolves with its reply. Raises Overloaded when full
        (each queue checks `max_queue` in the same step as it adds the job)."""
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = fut
        try:
            await self._enqueue(job)
        except BaseException:
            self._waiting.pop(job.id, None)
            raise
        return fut

    async def submit_detached(self, job: Job) -> None:
        """Enqueue a job nobody waits on: its status, progress and result are kept as a
        record (`record`) until job_ttl_s after its deadline or its end."""
        job.detached = True
        ttl_s = (job.deadline_ms - now_ms()) // 1000 + self.job_ttl_s
        await self._write_record(job.id, job_record(job), ttl_s)
        try:
            await self._enqueue(job)
        except BaseException:
            await self._delete_record(job.id)
            raise

    @abstractmethod
    async def record(self, job_id: str) -> dict[str, Any] | None:
        """A detached job's record: status queued | running | done | failed, progress,
        and its result or error; None when unknown or expired."""

    @abstractmethod
    async def _write_record(self, job_id: str, fields: dict[str, Any], ttl_s: int) -> None:
        """Create a record, or set fields of one, and give it ttl_s to live."""

    @abstractmethod
    async def _delete_record(self, job_id: str) -> None: ...

    def overloaded(self, model: str, depth: int) -> Overloaded:
        return Overloaded(f"model '{model}' has {depth} queued jobs (max_queue="
                          f"{self.max_queue}); retry later or raise CVSERVE_MAX_QUEUE",
                          retry_after_s=self.retry_after_s)

    def forget(self, job_id: str) -> None:
        """Stop waiting for a job (its client left or its deadline passed)."""
        fut = self._waiting.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def _resolve(self, reply: Reply) -> None:
        fut = self._waiting.pop(reply.job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    @abstractmethod
    async def cancel(self, job: Job) -> None:
        """The client left: a worker that has not run the job yet drops it."""

    @abstractmethod
    async def _enqueue(self, job: Job) -> None: ...

    @abstractmethod
    async def depth(self, model: str) -> int:
        """Jobs queued or in flight for a model."""

    @abstractmethod
    async def stats(self, models: list[str]) -> dict[str, QueueStats]:
        """Each model's queue for /metrics (`workers` left 0: the api counts those)."""

    @abstractmethod
    async def workers(self) -> list[WorkerInfo]:
        """Live workers and the models they serve."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the queue is reachable."""

    # --- worker side -------------------------------------------------------------------
    @abstractmethod
    async def fetch(self, model: str, count: int, block_ms: int) -> list[Job]:
        """Up to `count` jobs for a model, waiting at most `block_ms` for the first."""

    @abstractmethod
    async def reply(self, job: Job, reply: Reply) -> None:
        """Deliver a job's reply, then acknowledge the job."""

    async def progress(self, job: Job, done: int, total: int) -> None:
        """A detached job's progress (items done of total); a no-op for the others."""
        if job.detached:
            await self._record_progress(job.id, done, total)

    @abstractmethod
    async def _record_progress(self, job_id: str, done: int, total: int) -> None:
        """Mark a record running with this progress, unless it has already ended."""

    @abstractmethod
    async def cancelled(self, jobs: list[Job]) -> set[str]:
        """The ids among `jobs` whose clients cancelled them."""

    @abstractmethod
    async def drop(self, job: Job) -> None:
        """Acknowledge a job without a reply (its client is gone)."""

    @abstractmethod
    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        """Announce (or refresh) a worker; it disappears when not refreshed within ttl_s."""

    @abstractmethod
    async def unregister(self, worker_id: str) -> None: ...


class MemoryQueue(JobQueue):
    """In-process queue for embedded mode: api and worker share one event loop."""

    def __init__(self, max_queue: int, retry_after_s: int, job_ttl_s: int = 3600) -> None:
        super().__init__(max_queue, retry_after_s, job_ttl_s)
        self._records: dict[str, tuple[dict[str, Any], float]] = {}  # id -> (record, expiry)
        self._jobs: dict[str, deque[Job]] = {}
        self._in_flight: dict[str, dict[str, int]] = {}  # model -> job id -> enqueued_ms
        self._arrived: dict[str, asyncio.Event] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._cancelled: dict[str, int] = {}  # job id -> its deadline (then forgotten)

    def _event(self, model: str) -> asyncio.Event:
        return self._arrived.setdefault(model, asyncio.Event())

    async def _enqueue(self, job: Job) -> None:
        depth = await self.depth(job.model)  # no await inside: check and add are one step
        if depth >= self.max_queue:
            raise self.overloaded(job.model, depth)
        self._jobs.setdefault(job.model, deque()).append(job)
        self._event(job.model).set()

    async def depth(self, model: str) -> int:
        return len(self._jobs.get(model, ())) + len(self._in_flight.get(model, ()))

    async def stats(self, models: list[str]) -> dict[str, QueueStats]:
        out = {}
        for model in models:
            times = [*self._in_flight.get(model, {}).values(),
                     *(job.enqueued_ms for job in self._jobs.get(model, ()))]
            oldest = (now_ms() - min(times)) / 1000 if times else None
            out[model] = QueueStats(len(times), oldest, dead=0, workers=0)
        return out

    async def fetch(self, model: str, count: int, block_ms: int) -> list[Job]:
        jobs = self._jobs.setdefault(model, deque())
        if not jobs and block_ms > 0:
            event = self._event(model)
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), block_ms / 1000)
            except TimeoutError:
                return []
        taken = [jobs.popleft() for _ in range(min(count, len(jobs)))]
        self._in_flight.setdefault(model, {}).update((job.id, job.enqueued_ms) for job in taken)
        return taken

    async def reply(self, job: Job, reply: Reply) -> None:
        self._in_flight.get(job.model, {}).pop(job.id, None)
        if job.detached:
            await self._write_record(job.id, finished_record(reply), self.job_ttl_s)
        else:
            self._resolve(reply)

    async def record(self, job_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        self._records = {k: v for k, v in self._records.items() if v[1] > now}
        found = self._records.get(job_id)
        return dict(found[0]) if found else None

    async def _write_record(self, job_id: str, fields: dict[str, Any], ttl_s: int) -> None:
        old = self._records.get(job_id, ({}, 0.0))[0]
        self._records[job_id] = ({**old, **fields}, time.monotonic() + ttl_s)

    async def _delete_record(self, job_id: str) -> None:
        self._records.pop(job_id, None)

    async def _record_progress(self, job_id: str, done: int, total: int) -> None:
        found = self._records.get(job_id)
        if found and found[0]["status"] in ("queued", "running"):
            found[0].update(status="running", progress={"done": done, "total": total},
                            updated_ms=now_ms())

    async def cancel(self, job: Job) -> None:
        self._cancelled[job.id] = job.deadline_ms

    async def cancelled(self, jobs: list[Job]) -> set[str]:
        if not self._cancelled:
            return set()
        now = now_ms()
        self._cancelled = {k: d for k, d in self._cancelled.items() if d >= now}
        return {job.id for job in jobs if self._cancelled.pop(job.id, None) is not None}

    async def drop(self, job: Job) -> None:
        self._in_flight.get(job.model, {}).pop(job.id, None)

    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        self._workers[info.worker_id] = (info, time.monotonic() + ttl_s)

    async def unregister(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        return [info for info, expires in self._workers.values() if expires > now]

    async def ping(self) -> bool:
        return True
