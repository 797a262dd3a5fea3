"""Assembling processes: the embedded service, the api alone, the worker alone."""

from __future__ import annotations

import asyncio
import logging
import signal

from fastapi import FastAPI

from .api import create_app
from .queue import JobQueue, MemoryQueue
from .settings import Settings

log = logging.getLogger("cvserve")


def make_queue(settings: Settings, consumer: str | None = None) -> JobQueue:
    if settings.redis_url is None:
        return MemoryQueue(settings.max_queue, settings.retry_after_s, settings.job_ttl_s)
    from .redis_queue import RedisQueue
    return RedisQueue(settings, consumer)


def embedded_app(settings: Settings) -> FastAPI:
    """api + worker in one process over one queue (in-memory, or Redis when configured)."""
    from cvserve.worker.metrics import register_gpu_metrics
    from cvserve.worker.server import Worker, default_worker_id, serving_configs

    # One name for both roles: the consumer that holds jobs in Redis is the worker that
    # /models lists, so a pending job can be traced to the process holding it.
    worker_id = default_worker_id()
    queue = make_queue(settings, consumer=worker_id)
    worker = Worker(settings, queue, serving_configs(settings), worker_id=worker_id)
    register_gpu_metrics()  # the worker's metrics are this process's /metrics
    return create_app(settings, queue, on_startup=worker.start, on_shutdown=worker.stop)


def api_from_env() -> FastAPI:
    """The api alone (uvicorn factory, so `cvserve api --workers N` forks N of these)."""
    settings = Settings()
    if settings.redis_url is None:
        raise SystemExit("`cvserve api` needs CVSERVE_REDIS_URL (the queue it shares with "
                         "workers); `cvserve run` serves without Redis")
    return create_app(settings, make_queue(settings))


async def run_worker(settings: Settings) -> None:
    """A worker process: serve until SIGTERM / SIGINT, then stop taking jobs and exit."""
    from cvserve.worker.server import Worker, default_worker_id, serving_configs

    worker_id = default_worker_id()
    queue = make_queue(settings, consumer=worker_id)
    worker = Worker(settings, queue, serving_configs(settings), worker_id=worker_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.worker_metrics_port:  # from the start: the warm-up's measurements too
        from prometheus_client import start_http_server

        from cvserve.worker.metrics import register_gpu_metrics

        register_gpu_metrics()
        start_http_server(settings.worker_metrics_port, addr=settings.host)
        log.info("worker metrics on http://%s:%d/metrics", settings.host,
                 settings.worker_metrics_port)
    await worker.start()
    if not worker.runners:
        log.error("no model could be loaded; the worker has nothing to serve")
    log.info("worker %s serving %s", worker.worker_id, ", ".join(worker.runners) or "nothing")
    await stop.wait()
    log.info("stopping: no new jobs; unanswered ones go back to the other workers")
    await worker.stop()
    await queue.close()
