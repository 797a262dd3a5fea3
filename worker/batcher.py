"""Dynamic batching for one model: a two-stage pipeline (docs/design.md §3).

    intake:   fetch jobs -> decode + preprocess on the thread pool -> `ready`
    execute:  take what is ready and batches with the oldest ready job (same batch key, up
              to max_batch_size; wait up to max_queue_delay_ms only when the model gains
              from a larger batch) -> run on the model's own thread ->
              postprocess + reply on the thread pool, off the model's critical path

The next jobs are decoded while the model runs the current batch, so CPU work and model
work overlap instead of taking turns.

A streaming task's job (a video) is many items (its clips): the job is opened on the pool,
then its clips are decoded one at a time, round-robin over the open jobs, only while the
runner holds fewer than `capacity` items; they batch with any other job's clips, and the
job is answered once its last clip has run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cvserve.app.errors import (
    BackendError,
    CvserveError,
    DeadlineExceeded,
    InputError,
    UnsupportedMedia,
)
from cvserve.app.queue import Job, JobQueue, Reply, now_ms

from . import metrics
from .policy import BatchPolicy
from .streaming import StreamIntake
from .task import Prepared, Stream, StreamingTask, Task
from .tensors import TensorTask

log = logging.getLogger("cvserve.batcher")


def batch_limit(task: Task) -> int:
    """The largest batch the model.toml allows and the artifact can take."""
    limit = task.cfg.batching.max_batch_size
    return min(limit, task.backend.batch_limit or limit)


class ModelRunner(StreamIntake):
    """Pulls one model's jobs from the queue and runs them in dynamic batches."""

    def __init__(self, task: Task, queue: JobQueue, pool: ThreadPoolExecutor,
                 policy: BatchPolicy | None = None, tensors: TensorTask | None = None) -> None:
        self.task = task
        self.tensors = tensors or TensorTask(task)
        self.queue = queue
        self.pool = pool
        self.name = task.cfg.name
        self.policy = policy or BatchPolicy(batch_limit(task),
                                            task.cfg.batching.max_queue_delay_ms, "model.toml")
        self.max_batch_size = self.policy.max_batch_size
        self.max_queue_delay_s = self.policy.max_queue_delay_ms / 1000
        metrics.POLICY_MAX_BATCH.labels(self.name).set(self.max_batch_size)
        metrics.POLICY_DELAY.labels(self.name).set(self.policy.max_queue_delay_ms / 1000)
        for size, value in self.policy.throughput.items():
            metrics.BATCH_THROUGHPUT.labels(self.name, str(size)).set(value)
        metrics.zero(self.name)
        # Batches run at once (Triton's instance count): one model thread each.
        self.instances = self.policy.instances
        self._slots = asyncio.Semaphore(self.instances)
        self._running = 0  # batches on the model now
        # Jobs held at once (being decoded or ready): enough to decode one batch ahead
        # for every instance.
        self.capacity = 2 * self.max_batch_size * self.instances
        self.model_thread = ThreadPoolExecutor(self.instances,
                                               thread_name_prefix=f"model-{self.name}")
        self.ready: deque[Prepared] = deque()  # oldest first
        self.streaming = isinstance(task, StreamingTask)
        # A task whose some jobs are streams (a detector's /explain: an occlusion's
        # copies), the others plain items: task.opens_stream(job) tells them apart.
        self.mixed = not self.streaming and hasattr(task, "opens_stream")
        self.streams: deque[Stream] = deque()  # open jobs with items left to prepare
        self.decoding = 0  # jobs opened and not yet exhausted (streaming tasks)
        self._readied = asyncio.Event()
        self._preparing = 0
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._replies: set[asyncio.Task[Any]] = set()
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and logs

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._intake(), name=f"intake-{self.name}"),
                       asyncio.create_task(self._execute(), name=f"execute-{self.name}")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # Bounded, as in RedisQueue.close: a fetch whose cancellation the Redis client
            # loses (seen: intake left "cancelling" in a blocking XREADGROUP read, redis-py
            # 8.1) must not hold the stop forever; closing the queue ends that read.
            await asyncio.wait(self._tasks, timeout=5)
        # Batches on the model finish and answer (a finishing batch spawns its replies,
        # hence the loop); jobs not yet run are handed back by the queue's close.
        while self._replies:
            await asyncio.gather(*self._replies, return_exceptions=True)
        self.model_thread.shutdown(wait=True)

    # --- intake ------------------------------------------------------------------------
    def _held(self) -> int:
        return self._preparing + len(self.ready)

    def _job_room(self) -> int:
        room = self.capacity - self._held()
        if self.streaming or self.mixed:  # each open job decodes one item at a time
            room = min(room, self.capacity - self.decoding)
        return room

    async def _intake(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            room = self._job_room()
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                jobs = await self.queue.fetch(self.name, room, block_ms=250)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the queue is down: keep trying, never die
                log.warning("%s: fetch failed: %s; retrying", self.name, exc)
                await asyncio.sleep(0.5)
                continue
            for job in jobs:
                if job.expired:
                    self._reply_error(job, self._expired(job))
                    continue
                if job.task == "filters":  # GET /models/{name}/filters.png: not a batch item
                    self._spawn(self._answer_filters(job))
                    continue
                tensors = job.task == "tensors"  # the Open Inference Protocol's raw tensors
                if not tensors and (self.streaming or (self.mixed
                                                       and self.task.opens_stream(job))):
                    self._open(job)
                    continue
                self._preparing += 1
                fut = loop.run_in_executor(self.pool, self._task(job).timed_prepare, job)
                fut.add_done_callback(lambda f, job=job: self._prepared(job, f))

    def _prepared(self, job: Job, fut: asyncio.Future[Prepared]) -> None:
        self._preparing -= 1
        if fut.cancelled():  # shutting down: the job stays unanswered for another worker
            return
        exc = fut.exception()
        if exc is None:
            item = fut.result()
            metrics.INPUT_SECONDS.labels(self.name).observe(item.timing_ms["preprocess"] / 1000)
            self.ready.append(item)
            self._readied.set()
            return
        if not isinstance(exc, CvserveError):
            log.warning("%s: job %s failed in preprocessing: %r", self.name, job.id, exc)
            exc = UnsupportedMedia(f"could not decode or preprocess the input: {exc}")
        self._reply_error(job, exc)
        self._room.set()

    # --- execute -----------------------------------------------------------------------
    async def _next_batch(self) -> list[Prepared]:
        while not self.ready:
            self._readied.clear()
            await self._readied.wait()
        first = self.ready.popleft()
        key = self._key(first)
        batch = [first]
        self._take(batch, key)
        if self.max_queue_delay_s > 0 and len(batch) < self.max_batch_size:
            # Waiting pays only for a model whose throughput grows with batch size, and only
            # for jobs already on their way (being decoded): with none, a lone request
            # would just wait out the delay.
            deadline = time.monotonic() + self.max_queue_delay_s
            while (len(batch) < self.max_batch_size and self._preparing > 0
                   and (left := deadline - time.monotonic()) > 0):
                self._readied.clear()
                try:
                    await asyncio.wait_for(self._readied.wait(), left)
                except TimeoutError:
                    break
                self._take(batch, key)
        self._room.set()
        if self.streams:
            self._feed()
        live = []
        for item in batch:
            if item.stream is not None and item.stream.failed:
                continue
            if item.job.expired:
                metrics.CANCELLED.labels(self.name, "deadline").inc()
                self._fail_item(item, self._expired(item.job))
            else:
                live.append(item)
        return await self._drop_cancelled(live)

    async def _drop_cancelled(self, batch: list[Prepared]) -> list[Prepared]:
        """Jobs whose clients left are acknowledged unanswered, never run."""
        try:
            gone = await self.queue.cancelled([item.job for item in batch])
        except Exception as exc:  # the queue is down: run them; the reply will be dropped
            log.warning("%s: could not check for cancelled jobs: %s", self.name, exc)
            return batch
        if not gone:
            return batch
        for item in batch:
            if item.job.id not in gone or (item.stream is not None and item.stream.failed):
                continue
            if item.stream is not None:  # the job's other items are dropped as they come
                item.stream.failed = True
            log.info("%s: job %s dropped: its client disconnected", self.name, item.job.id)
            metrics.CANCELLED.labels(self.name, "client_disconnected").inc()
            self._spawn(self._drop(item.job))
        return [item for item in batch if item.job.id not in gone]

    async def _drop(self, job: Job) -> None:
        try:
            await self.queue.drop(job)
        except Exception as exc:
            log.warning("%s: could not acknowledge dropped job %s: %s", self.name, job.id, exc)

    def _task(self, job: Job) -> Task:
        """Who prepares, runs and answers a job: the model's task, or for raw tensors (the
        Open Inference Protocol) the backend alone."""
        return self.tensors if job.task == "tensors" else self.task

    def _key(self, item: Prepared) -> Hashable:
        """Jobs of one batch: the same kind (tensors or the task's), and the same key.
        A job redelivered after a worker died holding it may be what killed that worker
        (a poison job): it runs in a batch of its own, so the jobs it shared a batch with
        are not lost with it again, and only it climbs to max_deliveries."""
        key = item.job.task == "tensors", self._task(item.job).batch_key(item)
        return (*key, item.job.id) if item.job.deliveries > 1 else key

    def _take(self, batch: list[Prepared], key: Hashable) -> None:
        """Move ready jobs that batch with `key` into `batch`, oldest first; the others keep
        their place for the next batch."""
        keep: deque[Prepared] = deque()
        while self.ready:
            item = self.ready.popleft()
            if len(batch) < self.max_batch_size and self._key(item) == key:
                batch.append(item)
            else:
                keep.append(item)
        self.ready = keep

    async def _execute(self) -> None:
        """Form the next batch as soon as a model instance is free to run it."""
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            self._spawn(self._run_batch(batch))

    async def _run_batch(self, batch: list[Prepared]) -> None:
        try:
            await self._run(batch)
        finally:
            self._slots.release()

    async def _run(self, batch: list[Prepared]) -> None:
        loop = asyncio.get_running_loop()
        start_ms = now_ms()
        t0 = time.perf_counter()
        # Alone on the machine (no other batch running, none waiting or being decoded):
        # the backend may use every core for this one.
        solo = self._running == 0 and not self.ready and self._preparing == 0
        self._running += 1
        try:
            outputs = await loop.run_in_executor(self.model_thread, self._call, batch, solo)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._isolate(batch, exc)
            return
        finally:
            self._running -= 1
        infer_s = time.perf_counter() - t0
        self._count_batch(len(batch), infer_s)
        streamed = [(item, out) for item, out in zip(batch, outputs, strict=True)
                    if item.stream is not None]
        if streamed:
            self._collect([item for item, _ in streamed], [out for _, out in streamed],
                          infer_s)
        for item, output in zip(batch, outputs, strict=True):
            if item.stream is not None:
                continue
            item.timing_ms["queue"] = max(
                0.0, start_ms - item.job.enqueued_ms - item.timing_ms["preprocess"])
            item.timing_ms["inference"] = infer_s * 1000
            self._spawn(self._finish(item, output))

    def _call(self, batch: list[Prepared], solo: bool) -> Any:
        if not solo:
            return self._task(batch[0].job).run(batch)
        with self.task.backend.solo_threads():
            return self._task(batch[0].job).run(batch)

    def _count_batch(self, size: int, infer_s: float) -> None:
        metrics.EXECUTIONS.labels(self.name).inc()
        metrics.BATCH_SIZE.labels(self.name).observe(size)
        metrics.INFER_SECONDS.labels(self.name).observe(infer_s)
        self.batch_sizes = [*self.batch_sizes[-999:], size]
        log.debug("%s: ran a batch of %d in %.1f ms", self.name, size, infer_s * 1000)

    async def _isolate(self, batch: list[Prepared], exc: Exception) -> None:
        """A batch failed: run its jobs one by one so one bad job fails alone."""
        loop = asyncio.get_running_loop()
        if len(batch) == 1:
            log.error("%s: job %s failed in the model: %r", self.name, batch[0].job.id, exc)
            self._fail_item(batch[0], BackendError(f"the model failed on this input: {exc}"))
            return
        for item in batch:
            t0 = time.perf_counter()
            try:
                [output] = await loop.run_in_executor(self.model_thread,
                                                      self._task(item.job).run, [item])
            except Exception as one_exc:
                await self._isolate([item], one_exc)
                continue
            self._count_batch(1, time.perf_counter() - t0)
            if item.stream is not None:
                self._collect([item], [output], time.perf_counter() - t0)
                continue
            item.timing_ms["queue"] = 0.0
            item.timing_ms["inference"] = (time.perf_counter() - t0) * 1000
            self._spawn(self._finish(item, output))

    async def _finish(self, item: Prepared, output: Any) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            result, body = await loop.run_in_executor(self.pool, self._task(item.job).finish,
                                                      item, output)
        except Exception as exc:
            log.error("%s: postprocess failed for job %s: %r", self.name, item.job.id, exc)
            err = exc if isinstance(exc, CvserveError) else BackendError(
                f"postprocessing failed: {exc}")
            await self._send(item.job, Reply(item.job.id, error_code=err.code,
                                             error_message=err.message))
            return
        item.timing_ms["postprocess"] = (time.perf_counter() - t0) * 1000
        metrics.OUTPUT_SECONDS.labels(self.name).observe(item.timing_ms["postprocess"] / 1000)
        metrics.QUEUE_SECONDS.labels(self.name).observe(item.timing_ms["queue"] / 1000)
        result["timing"] = {k: round(v, 2) for k, v in item.timing_ms.items()}
        metrics.REQUEST_SUCCESS.labels(self.name).inc()
        await self._send(item.job, Reply(item.job.id, result=result, body=body))

    async def _answer_filters(self, job: Job) -> None:
        from .filters import render_filters

        loop = asyncio.get_running_loop()
        try:
            png = await loop.run_in_executor(self.pool, render_filters, self.task)
        except Exception as exc:
            log.warning("%s: no filter image: %r", self.name, exc)
            err = InputError(f"model {self.name} has no first-layer filters to show: {exc}")
            await self._send(job, Reply(job.id, error_code=err.code,
                                        error_message=err.message))
            return
        await self._send(job, Reply(job.id, result={}, body=png))

    # --- replies -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    def _expired(self, job: Job) -> DeadlineExceeded:
        late = now_ms() - job.deadline_ms
        return DeadlineExceeded(f"the job's deadline passed {late} ms before the model could "
                                "run it; raise `timeout_s` or CVSERVE_REQUEST_TIMEOUT_S")

    def _reply_error(self, job: Job, err: CvserveError) -> None:
        metrics.REQUEST_FAILURE.labels(self.name, err.code).inc()
        self._spawn(self._send(job, Reply(job.id, error_code=err.code,
                                          error_message=err.message)))

    async def _send(self, job: Job, reply: Reply) -> None:
        try:
            await self.queue.reply(job, reply)
        except Exception as exc:  # unacknowledged: another worker will reclaim it
            log.error("%s: could not reply to job %s: %r", self.name, job.id, exc)
