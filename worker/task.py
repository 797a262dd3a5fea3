"""The stages every task implements (decode+preprocess, run, postprocess+encode)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from cvserve.app.queue import Job, now_ms
from cvserve.app.settings import Settings

from .backend import Backend
from .repository import ModelConfig


@dataclass
class Prepared:
    """A job after decode and preprocess: the model input and what undoes the preprocess."""

    job: Job
    inputs: Any
    meta: dict[str, Any]
    timing_ms: dict[str, float] = field(default_factory=dict)
    stream: Stream | None = None  # the multi-item job this is one item of (a video's clip)
    index: int = 0  # its place in the stream


class Task(ABC):
    """A task's stages. `prepare` and `finish` run on the decode thread pool; `run` runs
    on the model's own thread, one batch at a time."""

    def __init__(self, cfg: ModelConfig, backend: Backend, settings: Settings) -> None:
        self.cfg = cfg
        self.backend = backend
        self.settings = settings
        self.labels = cfg.label_names()

    def label(self, class_id: int) -> str:
        """The class's name (its number when the labels file has none for it)."""
        if 0 <= class_id < len(self.labels):
            return self.labels[class_id]
        return str(class_id)

    def timed_prepare(self, job: Job) -> Prepared:
        t0 = time.perf_counter()
        item = self.prepare(job)
        item.timing_ms["preprocess"] = (time.perf_counter() - t0) * 1000
        return item

    def warmup_jobs(self) -> list[Job]:
        """Inputs for warm-up and the batching measurement: generated scenes, encoded as
        JPEG at a common photo size, so the whole path (decode included) runs."""
        from cvserve.models.synthetic import make_scene

        return [Job(model=self.cfg.name, task=self.cfg.task, deadline_ms=now_ms() + 3_600_000,
                    payload=make_scene(seed, 640, 480).jpeg()) for seed in range(2)]

    @abstractmethod
    def prepare(self, job: Job) -> Prepared:
        """Decode and preprocess one job's payload."""

    def batch_key(self, item: Prepared) -> Hashable:
        """Jobs run in one batch only when their keys are equal (default: any jobs)."""
        return None

    @abstractmethod
    def run(self, batch: list[Prepared]) -> list[Any]:
        """Collate a batch, run the backend once, split the outputs per item."""

    @abstractmethod
    def finish(self, item: Prepared, output: Any) -> tuple[dict[str, Any], bytes | None]:
        """Postprocess one item's output into the JSON result (and a PNG when asked)."""


@dataclass
class Stream:
    """A job whose work is many batch items (a video's clips), prepared one at a time so
    that only a few are held at once, and gathered back in order for `finish_stream`."""

    job: Job
    total: int  # items the job makes
    meta: dict[str, Any]  # what the task keeps between items (a decoder, the plan)
    produced: int = 0  # items prepared so far
    outputs: list[Any] = field(default_factory=list)  # by item index, None until run
    collected: int = 0  # items whose output came back
    failed: bool = False  # answered with an error: its other items are dropped
    busy: bool = False  # an item is being prepared (one at a time: the decoder is stateful)
    timing_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.outputs = [None] * self.total

    @property
    def exhausted(self) -> bool:
        return self.produced >= self.total

    @property
    def complete(self) -> bool:
        return self.collected >= self.total


class StreamingTask(Task):
    """A task whose job is many items: `open` plans them, `advance` prepares the next one
    (both on the decode pool), and `finish_stream` answers once all have run."""

    @abstractmethod
    def open(self, job: Job) -> Stream:
        """Check the input and plan its items; raises the job's 4xx errors."""

    @abstractmethod
    def advance(self, stream: Stream) -> Prepared:
        """Decode and preprocess the stream's next item (`stream.produced` counts it)."""

    @abstractmethod
    def finish_stream(self, stream: Stream) -> tuple[dict[str, Any], bytes | None]:
        """Postprocess all of a stream's outputs into the job's result."""

    def prepare(self, job: Job) -> Prepared:
        """The first item of a job: what the warm-up and the batch measurement run."""
        return self.advance(self.open(job))

    def finish(self, item: Prepared, output: Any) -> tuple[dict[str, Any], bytes | None]:
        raise TypeError("a streaming task answers through finish_stream")
