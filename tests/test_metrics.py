"""Metrics read from the queue and from NVML (tests/test_compose_e2e.py reads the rest
back through a real Prometheus)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cvserve.app.metrics import QueueStats, exposition
from cvserve.app.queue import Job, MemoryQueue, Reply, now_ms
from cvserve.app.redis_queue import RedisQueue
from cvserve.app.settings import Settings
from cvserve.worker.metrics import NvmlCollector


def job(model: str, age_s: float = 0.0) -> Job:
    return Job(model=model, task="detection", payload=b"x", deadline_ms=now_ms() + 60_000,
               enqueued_ms=now_ms() - int(age_s * 1000))


def samples(body: bytes) -> dict[tuple[str, str], float]:
    """{(sample name, model label): value}"""
    return {(s.name, s.labels.get("model", "")): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_memory_queue_counts_waiting_and_running_jobs_and_the_oldest() -> None:
    async def go() -> None:
        q = MemoryQueue(max_queue=10, retry_after_s=1)
        assert (await q.stats(["m"]))["m"] == QueueStats(0, None, 0, 0)
        await q.submit_detached(job("m", age_s=4.0))
        await q.submit_detached(job("m", age_s=1.0))
        await q.submit_detached(job("other"))
        taken = await q.fetch("m", 1, 0)  # the oldest is now running, still counted
        stats = await q.stats(["m", "other"])
        assert stats["m"].depth == 2 and 3.9 < stats["m"].oldest_age_s < 5
        assert stats["other"].depth == 1
        await q.reply(taken[0], Reply(job_id=taken[0].id, result={}))
        stats = await q.stats(["m"])
        assert stats["m"].depth == 1 and 0.9 < stats["m"].oldest_age_s < 2

    asyncio.run(go())


def test_redis_queue_reads_backlog_age_and_dead_letters(redis_url: str,
                                                        redis_prefix: str) -> None:
    async def go() -> None:
        q = RedisQueue(Settings(redis_url=redis_url, key_prefix=redis_prefix))
        try:
            assert (await q.stats(["m"]))["m"] == QueueStats(0, None, 0, 0)
            await q.submit_detached(job("m"))
            await asyncio.sleep(0.3)
            await q.submit_detached(job("m"))
            await q.redis.xadd(f"{redis_prefix}:dead:m", {"header": "{}"})
            stats = (await q.stats(["m"]))["m"]
            assert stats.depth == 2 and stats.dead == 1
            assert 0.3 <= stats.oldest_age_s < 5  # from the first job's entry id
            # A job being run is still in the backlog: deleted only when answered.
            fetched = await q.fetch("m", 1, 100)
            assert len(fetched) == 1 and (await q.stats(["m"]))["m"].depth == 2
        finally:
            await q.close()

    asyncio.run(go())


def test_queue_gauges_render_per_model() -> None:
    body = exposition({"a": QueueStats(3, 2.5, 1, 2), "b": QueueStats(0, None, 0, 1)})
    found = samples(body)
    assert found[("cvserve_queue_depth", "a")] == 3
    assert found[("cvserve_queue_oldest_job_age_seconds", "a")] == 2.5
    assert found[("cvserve_queue_oldest_job_age_seconds", "b")] == 0
    assert found[("cvserve_queue_dead_letter_depth", "a")] == 1
    assert found[("cvserve_model_workers", "b")] == 1


class FakeNvml:
    """pynvml's calls, answering for two GPUs: the one thing here that cannot be real."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=[37, 90][handle], memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30, free=0)


def gpu_samples(collector: NvmlCollector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {(s.name, s.labels["device"]): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples}


def test_gpu_metrics_per_device_in_base_units() -> None:
    found = gpu_samples(NvmlCollector(FakeNvml()))
    assert found[("cvserve_gpu_utilization_ratio", "cuda:0")] == pytest.approx(0.37)
    assert found[("cvserve_gpu_utilization_ratio", "cuda:1")] == pytest.approx(0.90)
    assert found[("cvserve_gpu_memory_used_bytes", "cuda:1")] == 2 * 2**30
    assert found[("cvserve_gpu_memory_total_bytes", "cuda:0")] == 80 * 2**30


def test_gpu_metrics_are_absent_without_nvml() -> None:
    assert gpu_samples(NvmlCollector(FakeNvml(fail_init=True))) == {}
    # This machine's own NVML (none without an NVIDIA driver) is either read or absent.
    real = NvmlCollector()
    assert bool(gpu_samples(real)) == bool(real.handles)


def test_a_model_s_counters_exist_before_its_first_event() -> None:
    from cvserve.worker import metrics

    name = f"fresh-{time.monotonic_ns()}"
    metrics.zero(name)
    found = samples(exposition({}))
    for counter in ("cvserve_inference_request_success_total", "cvserve_inference_exec_total",
                    "cvserve_jobs_reclaimed_total", "cvserve_jobs_dead_lettered_total"):
        assert found[(counter, name)] == 0
