"""The HTTP api: validate cheaply, enqueue, await the reply, render it (docs/design.md §5).

It never imports torch or onnxruntime: everything heavy happens in a worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Guard, MemoryCounter, RedisCounter
from .errors import (
    CvserveError,
    DeadlineExceeded,
    InputError,
    JobNotFound,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMedia,
    from_code,
)
from .media import VideoLimits, probe_image, probe_video
from .metrics import CLIENT_DISCONNECTS, HTTP_REQUESTS, HTTP_SECONDS, exposition
from .queue import Job, JobQueue, WorkerInfo, now_ms
from .schemas import (
    ClassifyVideoResponse,
    DetectResponse,
    ErrorResponse,
    ExplainResponse,
    JobAccepted,
    JobStatus,
    ModelInfo,
    ModelList,
    SegmentResponse,
)
from .settings import Settings
from .uploads import read_upload
from .v2 import OpenInference
from .v2 import router as v2_router

log = logging.getLogger("cvserve.api")

STATIC = Path(__file__).resolve().parent / "static"  # the web page at / (app/static/)

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "video/*": {"schema": {"type": "string", "format": "binary"}},
}}}
# A task's default model, when none is configured: real weights before the demo's
# before random ones, then by name.
WEIGHTS_RANK = {"pretrained": 0, "demo": 1, "random": 2}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 503, 504)}
VIDEO_TASKS = ("video-classification", "temporal-localization")
# worker/explain.py's METHODS (the api imports no worker code: it runs without torch).
EXPLAIN_METHODS = ("gradcam", "gradcam++", "cam", "saliency", "guided-backprop",
                   "guided-gradcam", "occlusion")
EXPLAINABLE = ("classification", *VIDEO_TASKS, "detection", "instance-segmentation")


def error_response(err: CvserveError, request_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else {}
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse({"error": err.to_dict()}, status_code=err.status, headers=headers)


class ModelDirectory:
    """What the live workers serve, from their heartbeats (cached for a second)."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._cache: tuple[float, list[WorkerInfo]] = (0.0, [])

    async def workers(self) -> list[WorkerInfo]:
        stamp, infos = self._cache
        if time.monotonic() - stamp > 1.0:
            infos = await self.queue.workers()
            self._cache = (time.monotonic(), infos)
        return infos

    async def models(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for info in await self.workers():
            for name, meta in info.models.items():
                if name not in out:
                    out[name] = ModelInfo(**meta)
                out[name].workers.append(info.worker_id)
        return dict(sorted(out.items()))

    async def resolve(self, name: str | None, tasks: tuple[str, ...],
                      default: str | None) -> ModelInfo:
        """The model to run: the one asked for (of one of the endpoint's tasks) or the
        endpoint's default (its first task's models before the others)."""
        models = await self.models()
        if name is None:
            name = default
        if name is None:
            candidates = [m for m in models.values() if m.task in tasks]
            if not candidates:
                raise Overloaded(f"no live worker serves a {' or '.join(tasks)} model; start "
                                 "a worker (`cvserve worker`) or check its log",
                                 retry_after_s=5)
            return min(candidates, key=lambda m: (tasks.index(m.task),
                                                  WEIGHTS_RANK.get(m.weights_kind, 0), m.name))
        if name not in models:
            raise ModelNotFound(f"model '{name}' is not served by any live worker (served: "
                                f"{', '.join(models) or 'none'}); GET /models lists them")
        if models[name].task not in tasks:
            raise InputError(f"model '{name}' is a {models[name].task} model; this endpoint "
                             f"needs a {' or '.join(tasks)} model")
        return models[name]


class ObserveMiddleware:
    """Request id (X-Request-ID, made when absent) and HTTP metrics, as plain ASGI:
    Starlette's BaseHTTPMiddleware costs a task and a stream per request (bench: ~1 ms
    of the api's share at concurrency 1)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = (headers.get(b"x-request-id") or uuid.uuid4().hex.encode()).decode(
            "latin-1")
        scope.setdefault("state", {})["request_id"] = request_id
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            HTTP_SECONDS.labels(endpoint, scope["method"]).observe(time.perf_counter() - t0)


class AuthMiddleware:
    """API keys and their rate limits (app/auth.py), before any route runs."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guard.enabled:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        try:
            await self.guard.check(scope["path"], authorization)
        except CvserveError as err:
            response = error_response(err, scope.get("state", {}).get("request_id"))
            if isinstance(err, Unauthorized):
                response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ClientGone(Exception):
    """The client disconnected before its answer came; no response is sent."""


async def client_left(request: Request) -> None:
    """Returns when the client disconnects. Called once the body has been read, so the
    only message left to receive is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings, queue: JobQueue,
               on_startup: Callable[[], Awaitable[Any]] | None = None,
               on_shutdown: Callable[[], Awaitable[Any]] | None = None) -> FastAPI:
    """The api over a queue. Embedded mode passes the in-process worker's start/stop."""
    directory = ModelDirectory(queue)
    redis = getattr(queue, "redis", None)  # counts shared by every api process, in Redis
    guard = Guard(settings, RedisCounter(redis, settings.key_prefix) if redis is not None
                  else MemoryCounter())

    async def submit(info: ModelInfo, params: dict[str, Any], data: bytes,
                     timeout_s: float | None, task: str | None) -> tuple[dict, bytes | None]:
        return await execute(queue, settings, info, params, data, timeout_s, task)

    v2 = OpenInference(settings, directory.models, queue.ping, submit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        if on_startup is not None:
            await on_startup()
        grpc_server = None
        if settings.grpc_port:
            from .v2_grpc import start

            grpc_server = await start(v2, settings, guard)
        try:
            yield
        finally:
            if grpc_server is not None:  # calls in flight get the grace period to finish
                await grpc_server.stop(settings.shutdown_grace_s)
            if on_shutdown is not None:
                await on_shutdown()
            await queue.close()

    app = FastAPI(title="cvserve", version="0.1.0", lifespan=lifespan,
                  description="Computer-vision inference: POST an image, get detections "
                              "or segmentation masks; POST a video, get its actions and "
                              "where they happen (long videos as jobs: GET /jobs/{id}).")
    app.state.settings = settings
    app.state.queue = queue

    # --- errors: one place maps every failure to the JSON error shape ------------------
    @app.exception_handler(CvserveError)
    async def _cvserve_error(request: Request, exc: CvserveError) -> JSONResponse:
        return error_response(exc, getattr(request.state, "request_id", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        return error_response(InputError(f"bad parameter: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}},
                            status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        # 499 as nginx logs it; the connection is closed, so nobody receives it.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": {"code": "internal", "message": repr(exc)}},
                            status_code=500)

    # Added first, so inside ObserveMiddleware: refusals get a request id and are counted.
    app.add_middleware(AuthMiddleware, guard=guard)
    app.add_middleware(ObserveMiddleware)

    # --- task endpoints ----------------------------------------------------------------
    async def run_job(request: Request, info: ModelInfo, params: dict[str, Any],
                      data: bytes, timeout_s: float | None, task: str | None = None
                      ) -> tuple[dict, bytes | None]:
        return await execute(queue, settings, info, params, data, timeout_s, task,
                             request.state.request_id, client_left(request))

    def wants_png(request: Request, fmt: str | None) -> bool:
        if fmt is not None:
            if fmt not in ("json", "png"):
                raise InputError(f"format must be json or png, got '{fmt}'")
            return fmt == "png"
        return "image/png" in request.headers.get("accept", "")

    @app.post("/detect", response_model=DetectResponse, openapi_extra=IMAGE_BODY,
              responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def detect(
        request: Request,
        model: str | None = Query(None, description="A detection or instance-segmentation "
                                                    "model; default per task"),
        score_threshold: float | None = Query(None, ge=0, le=1),
        max_detections: int | None = Query(None, ge=1, le=1000),
        mask_format: str | None = Query(None, description="instance models: rle (default, "
                                                          "COCO RLE) or polygon"),
        format: str | None = Query(None, description="json (default) or png"),
        timeout_s: float | None = Query(None, gt=0),
    ) -> Response:
        data, fields = await read_upload(request, settings.upload_bytes)
        args = _merge_form({"model": model, "score_threshold": score_threshold,
                            "max_detections": max_detections, "mask_format": mask_format,
                            "format": format, "timeout_s": timeout_s}, fields)
        probe_image(data, settings.image_pixels)  # 413 / 415 before anything is queued
        png = wants_png(request, args["format"])
        info = await directory.resolve(args["model"], ("detection", "instance-segmentation"),
                                       settings.default_detection_model)
        params = _instance_params(args)
        if png:
            params["render"] = "png"
        result, body = await run_job(request, info, params, data, args["timeout_s"])
        if png:
            return Response(body, media_type="image/png")
        return JSONResponse({"model": info.name, **result})

    @app.post("/segment", response_model=SegmentResponse, openapi_extra=IMAGE_BODY,
              responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def segment(
        request: Request,
        model: str | None = Query(None, description="A semantic or instance segmentation "
                                                    "model; default: a semantic one"),
        mask_format: str | None = Query(
            None, description="semantic: png (default: the label map as a palette PNG, "
                              "base64) or rle (COCO RLE per class); instance: rle (default) "
                              "or polygon"),
        render: str | None = Query(None, description="with Accept: image/png / format=png: "
                                                     "overlay (default) or labels (the raw "
                                                     "label map, semantic models)"),
        score_threshold: float | None = Query(None, ge=0, le=1),
        max_detections: int | None = Query(None, ge=1, le=1000),
        format: str | None = Query(None, description="json (default) or png"),
        timeout_s: float | None = Query(None, gt=0),
    ) -> Response:
        data, fields = await read_upload(request, settings.upload_bytes)
        args = _merge_form({"model": model, "mask_format": mask_format, "render": render,
                            "score_threshold": score_threshold,
                            "max_detections": max_detections, "format": format,
                            "timeout_s": timeout_s}, fields)
        probe_image(data, settings.image_pixels)
        png = wants_png(request, args["format"])
        info = await directory.resolve(args["model"],
                                       ("semantic-segmentation", "instance-segmentation"),
                                       settings.default_segmentation_model)
        if info.task == "semantic-segmentation":
            params = _semantic_params(args, png)
        else:
            params = _instance_params(args)
            if png:
                if args["render"] not in (None, "overlay"):
                    raise InputError("render=labels needs a semantic segmentation model")
                params["render"] = "png"
        result, body = await run_job(request, info, params, data, args["timeout_s"])
        if png:
            return Response(body, media_type="image/png")
        return JSONResponse({"model": info.name, **result})

    @app.post("/explain", response_model=ExplainResponse, openapi_extra=IMAGE_BODY,
              responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def explain(
        request: Request,
        model: str | None = Query(None, description="An image classifier (the default: the "
                                                    "best served), a video model (the "
                                                    "default for a video) or a detector"),
        method: str | None = Query(None, description=f"{' | '.join(EXPLAIN_METHODS)} "
                                                     "(default gradcam; detectors: "
                                                     "occlusion; video: gradcam, gradcam++)"),
        target: str | None = Query(None, description="Class id or label to explain "
                                                     "(default: the top-1)"),
        layer: str | None = Query(None, description="gradcam / gradcam++ / guided-gradcam: "
                                                    "a dotted module path (default: the "
                                                    "model's last conv block)"),
        num_clips: int | None = Query(None, ge=1, le=32, description="a video: clips "
                                                                    "explained (default 1)"),
        score_threshold: float | None = Query(None, ge=0, le=1, description="a detector: "
                                              "the detections explained score at least this"),
        max_detections: int | None = Query(None, ge=1, le=100, description="a detector: at "
                                           "most this many explained (default 5)"),
        patch: int | None = Query(None, ge=1, le=4096, description="occlusion: patch side "
                                                                   "in model input pixels"),
        stride: int | None = Query(None, ge=1, le=4096, description="occlusion: step"),
        top_k: int | None = Query(None, ge=1, le=100),
        render: str | None = Query(None, description="with Accept: image/png / format=png: "
                                                     "overlay (default) or heatmap (the "
                                                     "bare map)"),
        format: str | None = Query(None, description="json (default) or png"),
        timeout_s: float | None = Query(None, gt=0),
    ) -> Response:
        data, fields = await read_upload(
            request, max(settings.upload_bytes, settings.video_upload_bytes),
            "CVSERVE_UPLOAD_BYTES / CVSERVE_VIDEO_UPLOAD_BYTES")
        args = _merge_form({"model": model, "method": method, "target": target,
                            "layer": layer, "num_clips": num_clips,
                            "score_threshold": score_threshold,
                            "max_detections": max_detections, "patch": patch,
                            "stride": stride, "top_k": top_k, "render": render,
                            "format": format, "timeout_s": timeout_s}, fields)
        video = await _image_or_video(data, settings)
        if args["method"] is not None and args["method"] not in EXPLAIN_METHODS:
            hint = (" ('+' in a query string is a space: write method=gradcam%2B%2B)"
                    if args["method"].rstrip() == "gradcam" else "")
            raise InputError(f"method must be one of {', '.join(EXPLAIN_METHODS)}; got "
                             f"'{args['method']}'{hint}")
        if args["render"] not in (None, "overlay", "heatmap"):
            raise InputError(f"render must be overlay or heatmap, got '{args['render']}'")
        png = wants_png(request, args["format"])
        if args["model"] is not None:  # any explainable model; the media must fit it
            info = await directory.resolve(args["model"], EXPLAINABLE, None)
        elif video:
            info = await directory.resolve(None, VIDEO_TASKS, settings.default_video_model)
        else:
            info = await directory.resolve(None, ("classification",),
                                           settings.default_classification_model)
        if video != (info.task in VIDEO_TASKS):
            raise InputError(f"model '{info.name}' is a {info.task} model: send "
                             f"{'a video' if info.task in VIDEO_TASKS else 'an image'}")
        detector = info.task in ("detection", "instance-segmentation")
        params = {k: args[k] for k in ("target", "layer", "num_clips", "score_threshold",
                                       "max_detections", "patch", "stride", "top_k")
                  if args[k] is not None}
        # Also what tells a video model or a detector that the job is an explanation.
        params["method"] = args["method"] or ("occlusion" if detector else "gradcam")
        if png:
            params["render"] = args["render"] or "overlay"
        result, body = await run_job(request, info, params, data, args["timeout_s"])
        if png:
            return Response(body, media_type="image/png")
        return JSONResponse({"model": info.name, **result})

    @app.post("/classify-video", response_model=ClassifyVideoResponse,
              openapi_extra=VIDEO_BODY,
              responses={**ERRORS, 202: {"model": JobAccepted,
                                         "description": "Run as a job: poll status_url"}})
    async def classify_video(
        request: Request,
        model: str | None = Query(None, description="A video-classification or "
                                                    "temporal-localization model"),
        clip_len: int | None = Query(None, ge=1, le=512, description="Frames per clip "
                                                                      "(default: the model's)"),
        frame_rate: float | None = Query(None, gt=0, le=240, description="Frames per second "
                                                                         "sampled in a clip"),
        frame_stride: int | None = Query(None, ge=1, le=1000,
                                         description="Or: every n-th frame of the file"),
        num_clips: int | None = Query(None, ge=1, le=1000,
                                      description="Clips spread uniformly over the video"),
        clip_stride_s: float | None = Query(None, gt=0,
                                            description="Or: a clip every this many seconds "
                                                        "(sliding windows)"),
        top_k: int | None = Query(None, ge=1, le=100),
        clips: bool | None = Query(None, description="Also answer each clip's top labels"),
        localize: bool | None = Query(None, description="Temporal action localization: "
                                                        "segments[] over sliding windows"),
        score_threshold: float | None = Query(None, ge=0, le=1,
                                              description="localize: the lowest segment score"),
        nms_iou: float | None = Query(None, ge=0, le=1, description="localize: temporal NMS"),
        max_segments: int | None = Query(None, ge=1, le=1000),
        async_: bool | None = Query(None, alias="async",
                                    description="Answer 202 with a job id at once; GET "
                                                "/jobs/{id} for progress and the result"),
        timeout_s: float | None = Query(None, gt=0),
    ) -> Response:
        data, fields = await read_upload(request, settings.video_upload_bytes,
                                         "CVSERVE_VIDEO_UPLOAD_BYTES")
        args = _merge_form({"model": model, "clip_len": clip_len, "frame_rate": frame_rate,
                            "frame_stride": frame_stride, "num_clips": num_clips,
                            "clip_stride_s": clip_stride_s, "top_k": top_k, "clips": clips,
                            "localize": localize, "score_threshold": score_threshold,
                            "nms_iou": nms_iou, "max_segments": max_segments,
                            "async": async_, "timeout_s": timeout_s}, fields)
        if not data:
            raise InputError("the upload is empty; send a video as multipart `file` or as "
                             "the request body")
        # 413 / 415 before anything is queued; off the event loop (it decodes one frame).
        info = await asyncio.to_thread(probe_video, data,
                                      VideoLimits.from_settings(settings))
        if args["frame_rate"] is not None and args["frame_stride"] is not None:
            raise InputError("give frame_rate or frame_stride, not both")
        if args["num_clips"] is not None and args["clip_stride_s"] is not None:
            raise InputError("give num_clips (uniform) or clip_stride_s (sliding windows), "
                             "not both")
        model_info = await directory.resolve(args["model"], VIDEO_TASKS,
                                             settings.default_video_model)
        params = {k: v for k, v in args.items()
                  if v is not None and k not in ("model", "async", "timeout_s")}
        detached = bool(args["async"]) or info.duration_s > settings.async_video_duration_s
        if args["async"] is False and info.duration_s > settings.async_video_duration_s:
            detached = False  # the client asked to wait; its timeout_s still holds
        if not detached:
            result, _ = await run_job(request, model_info, params, data, args["timeout_s"])
            return JSONResponse({"model": model_info.name, **result})
        timeout = args["timeout_s"] or settings.async_job_timeout_s
        job = Job(model=model_info.name, task=model_info.task, payload=data, params=params,
                  deadline_ms=now_ms() + int(timeout * 1000),
                  request_id=request.state.request_id)
        await queue.submit_detached(job)
        url = f"/jobs/{job.id}"
        return JSONResponse(JobAccepted(job_id=job.id, status_url=url).model_dump(),
                            status_code=202, headers={"Location": url})

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses={404: ERRORS[404]})
    async def get_job(job_id: str) -> JSONResponse:
        record = await queue.record(job_id)
        if record is None:
            raise JobNotFound(f"no job '{job_id}': unknown, or its result expired "
                              f"(kept {settings.job_ttl_s} s after it ends, CVSERVE_JOB_TTL_S)")
        if record.get("status") == "done" and record.get("result") is not None:
            record["result"] = {"model": record["model"], **record["result"]}
        return JSONResponse(JobStatus(**record).model_dump(exclude_none=True))

    # --- models and health -------------------------------------------------------------
    @app.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(models=list((await directory.models()).values()))

    @app.get("/models/{name}", response_model=ModelInfo, responses={404: ERRORS[404]})
    async def get_model(name: str) -> ModelInfo:
        models = await directory.models()
        if name not in models:
            raise ModelNotFound(f"model '{name}' is not served by any live worker (served: "
                                f"{', '.join(models) or 'none'})")
        return models[name]

    @app.get("/models/{name}/filters.png", responses={
        200: {"content": {"image/png": {}}, "description": "The first layer's filters"},
        404: ERRORS[404]})
    async def get_filters(request: Request, name: str) -> Response:
        """The first convolution's filters as an image grid (worker/filters.py): RGB tiles
        for 2-D filters on colour input, a row of frames per filter for 3-D ones."""
        models = await directory.models()
        if name not in models:
            raise ModelNotFound(f"model '{name}' is not served by any live worker (served: "
                                f"{', '.join(models) or 'none'})")
        _, body = await run_job(request, models[name], {}, b"", None, task="filters")
        return Response(body, media_type="image/png")

    app.include_router(v2_router(v2, settings))

    # --- the web page: static files shipped with the package, nothing from a CDN ----------
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: ERRORS[503]})
    async def readyz() -> JSONResponse:
        if not await queue.ping():
            raise Overloaded("the queue (Redis) is unreachable", retry_after_s=1)
        models = await directory.models()
        if not models:
            raise Overloaded("no live worker serves a model yet", retry_after_s=1)
        return JSONResponse({"status": "ready", "models": list(models)})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        try:
            models = await directory.models()
            stats = await queue.stats(list(models))
            stats = {name: replace(s, workers=len(models[name].workers))
                     for name, s in stats.items()}
        except Exception as exc:  # the scrape still answers the HTTP metrics
            log.warning("/metrics: could not read the queue: %s", exc)
            stats = {}
        return Response(exposition(stats), media_type=CONTENT_TYPE_LATEST)

    return app


async def execute(queue: JobQueue, settings: Settings, info: ModelInfo, params: dict[str, Any],
                  data: bytes, timeout_s: float | None, task: str | None = None,
                  request_id: str = "", gone: Awaitable[None] | None = None
                  ) -> tuple[dict, bytes | None]:
    """Queue one job and wait for its answer: the result (with its total time) and body.
    `gone` resolves if the client leaves; the job is then cancelled (ClientGone)."""
    left = asyncio.ensure_future(gone) if gone is not None else None  # always consumed
    job = None
    try:
        name, task = info.name, task or info.task
        timeout = timeout_s if timeout_s is not None else settings.request_timeout_s
        if not 0 < timeout <= settings.max_request_timeout_s:
            raise InputError(f"timeout_s must be in (0, {settings.max_request_timeout_s}] "
                             "(CVSERVE_MAX_REQUEST_TIMEOUT_S)")
        t0 = time.perf_counter()
        # The job id is ours, not the client's X-Request-ID: two requests may send the same.
        job = Job(model=name, task=task, payload=data, params=params,
                  deadline_ms=now_ms() + int(timeout * 1000), request_id=request_id)
        future = await queue.submit(job)
        done, _ = await asyncio.wait({future, *([left] if left else [])}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if future not in done:
            if left is None or left not in done:
                raise DeadlineExceeded(f"no answer within {timeout:g} s (timeout_s / "
                                       "CVSERVE_REQUEST_TIMEOUT_S)")
            # Nobody will read the answer: tell the worker not to run the job.
            CLIENT_DISCONNECTS.labels(task).inc()
            await queue.cancel(job)
            raise ClientGone()
        reply = future.result()
    finally:
        if left is not None:
            left.cancel()
        if job is not None:
            queue.forget(job.id)
    if not reply.ok:
        raise from_code(reply.error_code or "internal", reply.error_message or "")
    result = dict(reply.result or {})
    result.setdefault("timing", {})["total"] = round((time.perf_counter() - t0) * 1000, 2)
    return result, reply.body


async def _image_or_video(data: bytes, settings: Settings) -> bool:
    """/explain takes both: True for a video. 413 / 415 before anything is queued, each
    kind held to its own limits."""
    try:
        probe_image(data, settings.image_pixels)
    except UnsupportedMedia as not_image:
        try:
            await asyncio.to_thread(probe_video, data, VideoLimits.from_settings(settings))
        except UnsupportedMedia as not_video:
            raise UnsupportedMedia(f"{not_image.message}; nor a video: "
                                   f"{not_video.message}") from None
        return True
    if len(data) > settings.upload_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is "
                              f"CVSERVE_UPLOAD_BYTES={settings.upload_bytes}")
    return False


def _instance_params(args: dict[str, Any]) -> dict[str, Any]:
    params = {k: args[k] for k in ("score_threshold", "max_detections") if args[k] is not None}
    mask_format = args.get("mask_format")
    if mask_format not in (None, "rle", "polygon"):
        raise InputError(f"mask_format must be rle or polygon for detection and instance "
                         f"models, got '{mask_format}'")
    if mask_format:
        params["mask_format"] = mask_format
    return params


def _semantic_params(args: dict[str, Any], png: bool) -> dict[str, Any]:
    mask_format, render = args["mask_format"], args["render"]
    if mask_format not in (None, "png", "rle"):
        raise InputError(f"mask_format must be png or rle for semantic segmentation, got "
                         f"'{mask_format}'")
    if render not in (None, "overlay", "labels"):
        raise InputError(f"render must be overlay or labels, got '{render}'")
    params: dict[str, Any] = {"mask_format": mask_format or "png"}
    if png:
        params["render"] = "labels" if render == "labels" else "png"
    return params


def _form_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


_form_bool.__name__ = "boolean (true / false)"

_FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    "score_threshold": float, "max_detections": int, "timeout_s": float,
    "clip_len": int, "frame_rate": float, "frame_stride": int, "num_clips": int,
    "clip_stride_s": float, "top_k": int, "nms_iou": float, "max_segments": int,
    "clips": _form_bool, "localize": _form_bool, "async": _form_bool, "patch": int,
    "stride": int}


def _merge_form(query: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Form fields act as query parameters (a query parameter wins); converted and checked."""
    args = dict(query)
    for key, raw in fields.items():
        if key not in args or args[key] is not None:
            continue
        convert = _FIELD_TYPES.get(key, str)
        try:
            args[key] = convert(raw)
        except ValueError:
            raise InputError(f"form field {key}={raw!r} is not a valid "
                             f"{convert.__name__}") from None
    for key, (low, high) in _FIELD_RANGES.items():
        value = args.get(key)
        if value is not None and not (low <= value <= high and math.isfinite(value)):
            raise InputError(f"{key} must be within [{low:g}, {high:g}], got {value}")
    for key in ("timeout_s", "clip_stride_s"):
        value = args.get(key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InputError(f"{key} must be a positive number, got {value}")
    return args


# What the endpoints' Query(...) bounds say, for values that came as form fields.
_FIELD_RANGES: dict[str, tuple[float, float]] = {
    "score_threshold": (0, 1), "max_detections": (1, 1000), "clip_len": (1, 512),
    "frame_rate": (1e-6, 240), "frame_stride": (1, 1000), "num_clips": (1, 1000),
    "top_k": (1, 100), "nms_iou": (0, 1), "max_segments": (1, 1000), "patch": (1, 4096),
    "stride": (1, 4096)}
