"""Process settings: one object per process, read from CVSERVE_* variables, passed down."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_model_repository() -> Path:
    """The `models/` folder of this installation (the repository's own in a clone)."""
    return Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    """Everything an api or worker process needs; validated once at start."""

    model_config = SettingsConfigDict(env_prefix="CVSERVE_", extra="ignore")

    # --- transport ---------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = Field(
        default=None, description="Use Redis as the queue; unset = embedded in-memory queue"
    )
    grpc_port: int | None = Field(
        default=None, description="Serve the Open Inference Protocol over gRPC on this port "
                                  "too (REST is always at /v2); unset = no gRPC")
    key_prefix: str = "cvserve"
    api_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-"
                        f"{uuid.uuid4().hex[:6]}")

    # --- models ------------------------------------------------------------------------
    model_repository: Path = Field(default_factory=default_model_repository)
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models a worker serves, comma-separated; empty = every model found")
    model_mirror: Path | None = Field(
        default=None,
        description="A folder holding the catalog's real models (`cvserve models pull`) so "
                    "they install offline; checked by sha256 like a download")
    default_detection_model: str | None = None
    default_segmentation_model: str | None = None
    default_video_model: str | None = None
    default_classification_model: str | None = None  # /explain
    auto_build_default: bool = Field(
        default=True, description="Build a detector when none exists (and a segmenter on a "
                                  "first start); pretrained when online, else random")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    fp16: bool = Field(
        default=False,
        description="On a GPU, run TorchScript models whose model.toml sets allow_fp16 = true "
                    "in half precision")
    gpu_jpeg_decode: bool = Field(
        default=False,
        description="On a GPU, decode plain RGB JPEGs with nvjpeg (CMYK, grayscale, "
                    "EXIF-rotated and other formats still go through Pillow)")

    # --- limits ------------------------------------------------------------------------
    upload_bytes: int = 20 * 1024 * 1024
    image_pixels: int = 40_000_000
    request_timeout_s: float = 30.0
    max_request_timeout_s: float = 300.0
    # Videos (/classify-video): their own upload limit, and what a request may make us decode.
    video_upload_bytes: int = 200 * 1024 * 1024
    video_max_duration_s: float = 3 * 3600.0
    video_max_pixels: int = 3840 * 2160
    video_max_frames_decoded: int = 50_000
    async_video_duration_s: float = Field(
        default=120.0, description="Videos longer than this run as jobs (202 + GET /jobs/{id}) "
                                   "even without async=true")
    async_job_timeout_s: float = Field(
        default=3600.0, gt=0, description="Deadline of a detached (async) job")

    # --- queue -------------------------------------------------------------------------
    max_queue: int = Field(default=256, description="Jobs queued per model before 503")
    retry_after_s: int = 1
    visibility_timeout_ms: int = Field(
        default=30_000, description="A pending job idle this long is reclaimed by another worker"
    )
    max_deliveries: int = 3
    inline_payload_bytes: int = 512 * 1024
    payload_ttl_s: int = 600
    heartbeat_s: float = 2.0
    reply_stream_ttl_s: int = 600
    job_ttl_s: int = Field(
        default=3600, ge=1, description="How long a detached (async) job's status and "
                                        "result stay readable at GET /jobs/{id} after it ends")

    keep_alive_s: float = Field(
        default=75.0, gt=0,
        description="How long the api keeps an idle HTTP connection open. Longer than "
                    "clients and load balancers keep theirs (httpx 5 s, AWS ALB 60 s; nginx "
                    "uses 75 s): a server that closes first races the next request sent on "
                    "the connection, which then fails with a reset instead of an answer")
    shutdown_grace_s: float = Field(
        default=30.0, gt=0, description="On SIGTERM the api stops accepting and waits this "
                                        "long for requests in flight to be answered")

    # --- access ------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys, comma-separated; any set = every "
                                          "request needs `Authorization: Bearer <key>`")
    api_keys_file: Path | None = Field(
        default=None, description="More API keys, one per line (# comments)")
    protect_health: bool = Field(default=False, description="/healthz and /readyz need a "
                                                            "key too")
    protect_metrics: bool = Field(default=False, description="/metrics needs a key too")
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, description="Requests a minute per API key (429 + Retry-After "
                                        "over it); shared through Redis when used")

    # --- worker ------------------------------------------------------------------------
    decode_threads: int = Field(
        default=0, ge=0, description="Threads that decode, preprocess and postprocess; "
                                     "0 = the number of cores")
    intra_op_threads: int = Field(default=0, ge=0, description="0 = the number of cores")
    onnx_spinning: bool = False
    worker_metrics_port: int | None = None

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        """CVSERVE_MODELS=a,b and CVSERVE_API_KEYS=k1,k2 (a JSON list works too)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s}) must not exceed "
                f"max_request_timeout_s ({self.max_request_timeout_s})"
            )
        if self.visibility_timeout_ms < 1000:
            raise ValueError("visibility_timeout_ms must be at least 1000 (a batch must fit)")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} is not a readable file")
        return self

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    @property
    def redis_url_for_logs(self) -> str | None:
        """The Redis URL with its password replaced, for logs and messages."""
        if self.redis_url is None:
            return None
        parts = urlsplit(self.redis_url)
        if parts.password is None:
            return self.redis_url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix: key('jobs', 'm') -> 'cvserve:jobs:m'."""
        return ":".join((self.key_prefix, *parts))

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
