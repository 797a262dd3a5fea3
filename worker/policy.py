"""Warm-up, and a batching policy that follows measured gain (docs/design.md §3).

When a model loads, it runs warm-up batches at every batch size it may use (so the first
real requests see steady-state latency, as Triton's model_warmup does) and times them.
From that curve comes the policy: the largest batch still worth forming, and whether to
wait for more jobs at all. On 2 CPU cores YOLOX-Nano runs as fast at batch 1 as at 16,
and a batcher that waits there only adds latency (../shared/PERF.md); Faster R-CNN runs
faster per image in batches of 2-4. A model.toml can pin the policy instead.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

from .task import Prepared, Task

log = logging.getLogger("cvserve.policy")

# A larger batch is worth forming when it raises throughput by at least this much over
# the best smaller one: below it, the difference is within run-to-run noise here.
MIN_GAIN = 0.10


@dataclass
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_ms: float
    source: str  # "measured" | "model.toml"
    instances: int = 1  # batches run at once, each on a model thread of its own
    # Images per second by batch size, from the warm-up runs.
    throughput: dict[int, float] = field(default_factory=dict)
    # Images/s with 1, 2 ... instances running the chosen batch size side by side.
    instance_throughput: dict[int, float] = field(default_factory=dict)
    warmup_s: float = 0.0

    def describe(self) -> dict:
        out = asdict(self)
        out["throughput"] = {str(k): round(v, 2) for k, v in self.throughput.items()}
        out["warmup_s"] = round(self.warmup_s, 2)
        out["instance_throughput"] = {str(k): round(v, 2)
                                      for k, v in self.instance_throughput.items()}
        return out


def candidate_sizes(limit: int, fixed: list[int] | None) -> list[int]:
    """1, 2, 4 ... up to `limit` (and `limit` itself), or the sizes a model is fixed to."""
    if fixed:
        return [b for b in fixed if b <= limit] or [fixed[0]]
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b *= 2
    return [*sizes, limit]


def choose(throughput: dict[int, float], max_queue_delay_ms: float) -> tuple[int, float]:
    """(largest batch worth forming, queue delay): grow the batch while each step raises
    throughput by MIN_GAIN over the best so far; wait for more jobs only if it does."""
    sizes = sorted(throughput)
    chosen, best = sizes[0], throughput[sizes[0]]
    for b in sizes[1:]:
        if throughput[b] >= best * (1 + MIN_GAIN):
            chosen, best = b, throughput[b]
    return chosen, (max_queue_delay_ms if chosen > sizes[0] else 0.0)


def measure(task: Task, items: list[Prepared], sizes: list[int],
            min_rounds: int = 3, min_time_s: float = 0.5, budget_s: float = 30.0
            ) -> dict[int, float]:
    """Images/s at each batch size. Each size first runs twice untimed (graph optimizers
    and allocators settle over the first runs); then rounds that run every size once, so
    that a burst of load from elsewhere on the machine slows all sizes alike rather than
    whichever was being measured. At least `min_rounds` rounds and `min_time_s`, at most
    `budget_s`; a size's median run counts."""
    batches = {b: [items[i % len(items)] for i in range(b)] for b in sizes}
    for batch in batches.values():
        for _ in range(2):
            task.run(batch)
    runs: dict[int, list[float]] = {b: [] for b in sizes}
    start = time.perf_counter()
    while True:
        for b, batch in batches.items():
            t0 = time.perf_counter()
            task.run(batch)
            runs[b].append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        rounds = len(runs[sizes[0]])
        if rounds >= min_rounds and spent >= min_time_s or spent >= budget_s or rounds >= 50:
            break
    return {b: b / statistics.median(times) for b, times in runs.items()}


def measure_instances(task: Task, batch: list[Prepared], counts: list[int],
                      window_s: float = 0.3, rounds: int = 3) -> dict[int, float]:
    """Images/s with k threads each running `batch` back to back, for each k in `counts`;
    interleaved windows, as in `measure`. A model whose single run leaves cores idle
    (a small ONNX graph on a CPU, whose intra-op threads scale poorly) gains from a
    second instance; one that already fills the machine does not."""
    done: dict[int, list[float]] = {k: [] for k in counts}
    for _ in range(rounds):
        for k in counts:
            images = [0] * k
            stop = time.perf_counter() + window_s

            def loop(i: int, stop: float = stop, images: list[int] = images) -> None:
                while time.perf_counter() < stop:
                    task.run(batch)
                    images[i] += len(batch)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            done[k].append(sum(images) / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in done.items()}


def warm_up(task: Task, limit: int) -> BatchPolicy:
    """Run the model at each batch size it may use and set its policy."""
    t0 = time.perf_counter()
    batching = task.cfg.batching
    items = [task.timed_prepare(job) for job in task.warmup_jobs()]
    sizes = candidate_sizes(limit, task.backend.batch_sizes)
    throughput = measure(task, items, sizes)
    if batching.policy == "fixed":
        policy = BatchPolicy(limit, batching.max_queue_delay_ms, "model.toml",
                             instances=batching.instances or 1, throughput=throughput)
    else:
        chosen, delay = choose(throughput, batching.max_queue_delay_ms)
        policy = BatchPolicy(chosen, delay, "measured", throughput=throughput)
        if batching.instances is not None:
            policy.instances = batching.instances
        else:
            counts = list(range(1, min(2, len(os.sched_getaffinity(0))) + 1))
            batch = [items[i % len(items)] for i in range(chosen)]
            policy.instance_throughput = measure_instances(task, batch, counts)
            policy.instances, _ = choose(policy.instance_throughput, 0.0)
    policy.warmup_s = time.perf_counter() - t0
    curve = ", ".join(f"{b}: {v:.1f}/s" for b, v in throughput.items())
    log.info("%s: warm-up took %.1f s; images/s by batch size {%s} -> batches up to %d, "
             "queue delay %g ms, %d instance(s) (%s)", task.cfg.name, policy.warmup_s, curve,
             policy.max_batch_size, policy.max_queue_delay_ms, policy.instances,
             policy.source)
    return policy
