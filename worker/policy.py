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
import statistics
import threading
import time
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field

from .task import Prepared, Task

log = logging.getLogger("cvserve.policy")

# A larger batch is worth forming when it raises throughput by at least this much over
# the best smaller one: below it, the difference is within run-to-run noise here.
MIN_GAIN = 0.10
MAX_RUN_S = 2.0


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


def measure(task: Task, configs: dict[Hashable, tuple[list[Prepared], int]],
            window_s: float = 0.3, rounds: int = 3) -> dict[Hashable, float]:
    """Images/s of each configuration: `(batch, k)` is k threads each running `batch` back
    to back (k model instances). Each configuration first runs twice untimed on each of
    its threads (graph optimizers and allocators settle over the first runs); then rounds
    of one `window_s` window per configuration, interleaved, so that a burst of load from
    elsewhere on the machine slows all of them alike; the median window counts."""
    def repeat(batch: list[Prepared], k: int, until: float | None) -> int:
        done = [0] * k

        def loop(i: int) -> None:
            runs = 0
            while (runs < 2) if until is None else (time.perf_counter() < until):
                task.run(batch)
                runs += 1
                done[i] += len(batch)

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done)

    for batch, k in configs.values():
        repeat(batch, k, None)
    windows: dict[Hashable, list[float]] = {key: [] for key in configs}
    for _ in range(rounds):
        for key, (batch, k) in configs.items():
            t0 = time.perf_counter()
            images = repeat(batch, k, t0 + window_s)
            windows[key].append(images / (time.perf_counter() - t0))
    return {key: statistics.median(v) for key, v in windows.items()}


def choose_instances(task: Task, one: list[Prepared]) -> tuple[int, dict[int, float]]:
    """One instance with every core's intra-op threads, or one single-threaded instance per
    core, at batch 1. Measured here on YOLOX-Nano (onnxruntime, 2 cores): 42-46 images/s
    for the first, 67-76 for the second (intra-op threads synchronize on every one of its
    ~400 small ops); Faster R-CNN MobileNet (TorchScript): 10.9 and 17.1. A model whose
    run fills the cores anyway gains nothing and keeps one instance. With single-threaded
    instances a model keeps every core for a batch that runs alone (onnxruntime: its
    multi-threaded sessions; TorchScript: that thread's count), so low load keeps the
    latency of one run on every core. On a GPU: one instance or two, threads as they are."""
    cores = task.settings.cores
    # A backend without per-thread counts (TorchScript on a GPU, or where torch's OpenMP
    # runtime is not found) stays at one instance; `instances = N` still pins more.
    if cores < 2 or not task.backend.parallel_instances:
        return 1, {}
    single = measure(task, {1: (one, 1)})[1]
    if single * MAX_RUN_S < 1:
        # A run of seconds: its large ops keep every core busy anyway, and measuring the
        # other layout would add tens of seconds to the warm-up (as for batch sizes).
        log.info("%s: one instance: a run takes %.1f s, so no other layout is tried",
                 task.cfg.name, 1 / single)
        return 1, {1: single}
    on_cpu = task.backend.device == "cpu"
    count = cores if on_cpu else 2
    if on_cpu:  # the multi-threaded sessions stay, for a batch that runs alone
        task.backend.set_threads(1, keep=True)
    multi = measure(task, {count: (one, count)})[count]
    if multi >= single * (1 + MIN_GAIN):
        return count, {1: single, count: multi}
    task.backend.set_threads(cores)
    return 1, {1: single, count: multi}


def warm_up(task: Task, limit: int) -> BatchPolicy:
    """Run the model at each batch size it may use and set its policy: first how many
    instances run side by side, then, with that many, how large a batch pays."""
    t0 = time.perf_counter()
    batching = task.cfg.batching
    items = [task.timed_prepare(job) for job in task.warmup_jobs()]
    sizes = candidate_sizes(limit, task.backend.batch_sizes)
    batches = {b: [items[i % len(items)] for i in range(b)] for b in sizes}
    fixed = batching.policy == "fixed"
    instances, by_instances = batching.instances or 1, {}
    if batching.instances is None and not fixed and not task.settings.intra_op_threads:
        instances, by_instances = choose_instances(task, batches[sizes[0]])
    if fixed:  # as written: warm-up runs at each size (Triton's model_warmup), no timing
        for batch in batches.values():
            for _ in range(2):
                task.run(batch)
        policy = BatchPolicy(limit, batching.max_queue_delay_ms, "model.toml")
        throughput: dict[int, float] = {}
    else:
        # Sizes whose one run would take over MAX_RUN_S are not tried (a large model on a
        # CPU): the warm-up stays within seconds, and the batches those sizes would form
        # would hold their first request that long anyway.
        first = measure(task, {sizes[0]: (batches[sizes[0]], instances)},
                        rounds=1)[sizes[0]]
        tried = [b for b in sizes if b == sizes[0] or b * instances / first <= MAX_RUN_S]
        if len(tried) < len(sizes):
            log.info("%s: batch sizes %s not tried: a run would take over %g s",
                     task.cfg.name, sizes[len(tried):], MAX_RUN_S)
        throughput = measure(task, {b: (batches[b], instances) for b in tried})
        chosen, delay = choose(throughput, batching.max_queue_delay_ms)
        policy = BatchPolicy(chosen, delay, "measured")
    policy.instances, policy.instance_throughput = instances, by_instances
    policy.throughput = throughput
    policy.warmup_s = time.perf_counter() - t0
    curve = ", ".join(f"{b}: {v:.1f}/s" for b, v in throughput.items())
    log.info("%s: warm-up took %.1f s; %d instance(s) (images/s by instances %s); images/s "
             "by batch size {%s} -> batches up to %d, queue delay %g ms (%s)",
             task.cfg.name, policy.warmup_s, instances,
             {k: round(v, 1) for k, v in by_instances.items()}, curve,
             policy.max_batch_size, policy.max_queue_delay_ms, policy.source)
    return policy
