"""The intake of a streaming task's jobs (a video: many clips), part of ModelRunner.

A job is opened on the decode pool (probe + plan), then its items are prepared one at a
time — round-robin over the open jobs — only while the runner holds fewer than its
`capacity` items, so memory stays a few items whatever a job's length. Their outputs are
gathered back per job, and the job is answered once its last item has run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cvserve.app.errors import BackendError, CvserveError, UnsupportedMedia
from cvserve.app.queue import Job, JobQueue, Reply, now_ms

from . import metrics
from .task import Prepared, Stream, StreamingTask, Task

log = logging.getLogger("cvserve.batcher")


class StreamIntake:
    """ModelRunner's methods for streaming tasks; they share the runner's state."""

    name: str
    task: Task
    queue: JobQueue
    pool: ThreadPoolExecutor
    capacity: int
    ready: deque[Prepared]
    streams: deque[Stream]  # open jobs with items left to prepare
    decoding: int  # jobs opened and not yet exhausted
    _preparing: int
    _readied: asyncio.Event
    _room: asyncio.Event

    def _held(self) -> int:
        raise NotImplementedError

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    def _reply_error(self, job: Job, err: CvserveError) -> None:
        raise NotImplementedError

    async def _send(self, job: Job, reply: Reply) -> None:
        raise NotImplementedError

    def _open(self, job: Job) -> None:
        assert isinstance(self.task, StreamingTask) or hasattr(self.task, "opens_stream")
        self._preparing += 1
        self.decoding += 1
        opened_ms = now_ms()
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self._timed_open, job)
        fut.add_done_callback(lambda f: self._opened(job, opened_ms, f))

    def _timed_open(self, job: Job) -> Stream:
        t0 = time.perf_counter()
        stream = self.task.open(job)  # type: ignore[attr-defined]
        stream.timing_ms["preprocess"] = (time.perf_counter() - t0) * 1000
        return stream

    def _opened(self, job: Job, opened_ms: int, fut: asyncio.Future[Stream]) -> None:
        self._preparing -= 1
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.decoding -= 1
            self._fail_job(job, exc, "opening the input")
            self._room.set()
            return
        stream = fut.result()
        stream.timing_ms["queue"] = max(0.0, opened_ms - job.enqueued_ms)
        if stream.exhausted:  # nothing to run (no items): answer at once
            self.decoding -= 1
            self._spawn(self._finish_stream(stream))
            return
        self.streams.append(stream)
        self._feed()

    def _feed(self) -> None:
        """Start preparing the next item of open jobs, round-robin, while there is room."""
        loop = asyncio.get_running_loop()
        for _ in range(len(self.streams)):
            if self._held() >= self.capacity:
                return
            stream = self.streams.popleft()
            if stream.failed:  # answered while it waited here
                self.decoding -= 1
                self._room.set()
                continue
            stream.busy = True
            self._preparing += 1
            fut = loop.run_in_executor(self.pool, self._timed_advance, stream)
            fut.add_done_callback(lambda f, stream=stream: self._advanced(stream, f))

    def _timed_advance(self, stream: Stream) -> Prepared:
        t0 = time.perf_counter()
        item = self.task.advance(stream)  # type: ignore[attr-defined]
        item.timing_ms["preprocess"] = (time.perf_counter() - t0) * 1000
        return item

    def _advanced(self, stream: Stream, fut: asyncio.Future[Prepared]) -> None:
        self._preparing -= 1
        stream.busy = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._fail_stream(stream, exc, "decoding a clip")
        elif not stream.failed:
            item = fut.result()
            stream.timing_ms["preprocess"] += item.timing_ms["preprocess"]
            metrics.INPUT_SECONDS.labels(self.name).observe(item.timing_ms["preprocess"] / 1000)
            self.ready.append(item)
            self._readied.set()
        if stream.failed or stream.exhausted:
            self.decoding -= 1
            self._room.set()
        else:
            self.streams.append(stream)
        self._feed()

    def _fail_job(self, job: Job, exc: BaseException, stage: str) -> None:
        if not isinstance(exc, CvserveError):
            log.warning("%s: job %s failed %s: %r", self.name, job.id, stage, exc)
            exc = UnsupportedMedia(f"could not decode or preprocess the input: {exc}")
        self._reply_error(job, exc)

    def _fail_stream(self, stream: Stream, exc: BaseException, stage: str) -> None:
        """Answer a multi-item job's error once; its other items are dropped as they come."""
        if stream.failed:
            return
        stream.failed = True
        self._fail_job(stream.job, exc, stage)

    def _fail_item(self, item: Prepared, exc: CvserveError) -> None:
        if item.stream is not None:
            self._fail_stream(item.stream, exc, "")
        else:
            self._reply_error(item.job, exc)

    def _collect(self, items: list[Prepared], outputs: list[Any], infer_s: float) -> None:
        """Outputs of streamed items go back to their jobs; a job done is answered."""
        touched: dict[int, Stream] = {}
        for item, output in zip(items, outputs, strict=True):
            stream = item.stream
            assert stream is not None
            if stream.failed:
                continue
            stream.outputs[item.index] = output
            stream.collected += 1
            touched[id(stream)] = stream
        for stream in touched.values():
            stream.timing_ms["inference"] = stream.timing_ms.get("inference", 0.0) + infer_s * 1000
            if stream.complete:
                self._spawn(self._finish_stream(stream))
            else:
                self._spawn(self._progress(stream))

    async def _progress(self, stream: Stream) -> None:
        try:
            await self.queue.progress(stream.job, stream.collected, stream.total)
        except Exception as exc:  # progress is advisory; the answer still comes
            log.warning("%s: could not record progress of job %s: %s", self.name,
                        stream.job.id, exc)

    async def _finish_stream(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        job = stream.job
        t0 = time.perf_counter()
        try:
            result, body = await loop.run_in_executor(
                self.pool, self.task.finish_stream, stream)  # type: ignore[attr-defined]
        except Exception as exc:
            log.error("%s: postprocess failed for job %s: %r", self.name, job.id, exc)
            err = exc if isinstance(exc, CvserveError) else BackendError(
                f"postprocessing failed: {exc}")
            self._reply_error(job, err)
            return
        stream.timing_ms["postprocess"] = (time.perf_counter() - t0) * 1000
        metrics.OUTPUT_SECONDS.labels(self.name).observe(stream.timing_ms["postprocess"] / 1000)
        metrics.QUEUE_SECONDS.labels(self.name).observe(stream.timing_ms["queue"] / 1000)
        result["timing"] = {k: round(v, 2) for k, v in stream.timing_ms.items()}
        metrics.REQUEST_SUCCESS.labels(self.name).inc()
        await self._progress(stream)  # the final count lands before the result, not after
        await self._send(job, Reply(job.id, result=result, body=body))
