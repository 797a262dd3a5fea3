"""Worker metrics, named after Triton's where the meaning is the same (docs/design.md §6)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Counted where the queue reclaims and dead-letters: in the worker, by app/redis_queue.py.
from cvserve.app.metrics import DEAD_LETTERED, RECLAIMED

log = logging.getLogger("cvserve.metrics")

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

REQUEST_SUCCESS = Counter("cvserve_inference_request_success", "Jobs answered with a result",
                          ["model"])
REQUEST_FAILURE = Counter("cvserve_inference_request_failure", "Jobs answered with an error",
                          ["model", "code"])
EXECUTIONS = Counter("cvserve_inference_exec", "Batches run by the model", ["model"])
BATCH_SIZE = Histogram("cvserve_inference_batch_size", "Jobs per model execution", ["model"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
QUEUE_SECONDS = Histogram("cvserve_inference_queue_duration_seconds",
                          "Enqueue to start of the job's batch, less preprocessing", ["model"],
                          buckets=_LATENCY)
INPUT_SECONDS = Histogram("cvserve_inference_compute_input_duration_seconds",
                          "Decode and preprocess per job", ["model"], buckets=_LATENCY)
INFER_SECONDS = Histogram("cvserve_inference_compute_infer_duration_seconds",
                          "Model execution per batch", ["model"], buckets=_LATENCY)
OUTPUT_SECONDS = Histogram("cvserve_inference_compute_output_duration_seconds",
                           "Postprocess and encode per job", ["model"], buckets=_LATENCY)
CANCELLED = Counter("cvserve_inference_cancelled", "Jobs dropped before the model ran them",
                    ["model", "reason"])  # reason: client_disconnected | deadline
BATCH_THROUGHPUT = Gauge("cvserve_batch_throughput_images_per_second",
                         "Warm-up measurement: images/s at each batch size",
                         ["model", "batch_size"])
POLICY_MAX_BATCH = Gauge("cvserve_batch_policy_max_batch_size",
                         "The largest batch the policy forms", ["model"])
POLICY_DELAY = Gauge("cvserve_batch_policy_max_queue_delay_seconds",
                     "How long a batch waits for more jobs", ["model"])


def zero(model: str) -> None:
    """Create a model's counters at 0 when it loads: a series that appears only with its
    first event makes rate() and the dashboard blind to that first event."""
    for counter in (REQUEST_SUCCESS, EXECUTIONS, RECLAIMED, DEAD_LETTERED):
        counter.labels(model)
    for reason in ("client_disconnected", "deadline"):
        CANCELLED.labels(model, reason)


class NvmlCollector(Collector):
    """GPU utilization and memory per device, read through NVML at each scrape (Triton's
    nv_gpu_utilization / nv_gpu_memory_*_bytes). Without a GPU, or without the NVIDIA
    driver's library, it yields nothing: the series are absent, not zero."""

    def __init__(self, nvml: Any = None) -> None:
        self.nvml = nvml
        self.handles: list[tuple[str, str, Any]] = []  # (device, uuid, handle)
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                return
            self.nvml = pynvml
        try:
            self.nvml.nvmlInit()
            for i in range(self.nvml.nvmlDeviceGetCount()):
                handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = self.nvml.nvmlDeviceGetUUID(handle)
                self.handles.append((f"cuda:{i}", _text(uuid), handle))
        except self.nvml.NVMLError as exc:
            log.info("no GPU metrics: NVML is not available (%s)", exc)
            self.handles = []

    def collect(self) -> Iterator[Metric]:
        if not self.handles:
            return
        util = GaugeMetricFamily("cvserve_gpu_utilization_ratio",
                                 "Fraction of the last sample period a kernel ran",
                                 labels=["device", "uuid"])
        used = GaugeMetricFamily("cvserve_gpu_memory_used_bytes", "GPU memory in use",
                                 labels=["device", "uuid"])
        total = GaugeMetricFamily("cvserve_gpu_memory_total_bytes", "GPU memory in all",
                                  labels=["device", "uuid"])
        for device, uuid, handle in self.handles:
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except self.nvml.NVMLError as exc:  # a device gone bad: skip it this scrape
                log.warning("NVML could not read %s: %s", device, exc)
                continue
            util.add_metric([device, uuid], rates.gpu / 100)
            used.add_metric([device, uuid], memory.used)
            total.add_metric([device, uuid], memory.total)
        yield from (util, used, total)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_gpu_registered = False


def register_gpu_metrics() -> None:
    """Once per process (the worker, or the embedded service)."""
    global _gpu_registered
    if not _gpu_registered:
        REGISTRY.register(NvmlCollector())
        _gpu_registered = True
