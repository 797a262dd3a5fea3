"""A Python client for cvserve: `from cvserve.client import Client`.

    with Client("http://127.0.0.1:8000") as c:
        found = c.detect("street.jpg", score_threshold=0.5)
        print([(d.label, d.score) for d in found.detections])

Answers are the api's own pydantic models (cvserve.app.schemas). A 429 or 503 is retried
after the server's Retry-After (or an exponential backoff), as is a connection refused
before the request was sent; any other error raises `CvserveHTTPError` with the api's
code and message. Long videos go through the job API: `classify_video` waits for the job
and reports its progress. `AsyncClient` has the same methods as coroutines. Nothing here
imports torch: the client installs with the api's light dependencies.
"""

from __future__ import annotations

import asyncio
import io
import mimetypes
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
from pydantic import BaseModel

from cvserve.app.errors import from_code
from cvserve.app.schemas import (
    ClassifyVideoResponse,
    DetectResponse,
    ExplainResponse,
    JobStatus,
    ModelInfo,
    ModelList,
    SegmentResponse,
)

__all__ = ["AsyncClient", "Client", "CvserveHTTPError", "Media", "Progress"]

Media = str | os.PathLike[str] | bytes | BinaryIO
Progress = Callable[[int, int | None], Any]  # (clips done, clips planned) of a video job
T = TypeVar("T", bound=BaseModel)

RETRIED = (429, 503)
# The answer each endpoint's JSON parses into.
SCHEMAS: dict[str, type[BaseModel]] = {
    "detect": DetectResponse, "segment": SegmentResponse,
    "classify-video": ClassifyVideoResponse, "explain": ExplainResponse,
}


class CvserveHTTPError(Exception):
    """The api answered with an error: its HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str,
                 request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id

    @classmethod
    def from_response(cls, response: httpx.Response) -> CvserveHTTPError:
        try:
            error = response.json()["error"]
            code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):  # not cvserve's error shape (a proxy's?)
            code, message = "http_error", response.text[:500] or response.reason_phrase
        return cls(response.status_code, code, message, response.headers.get("x-request-id"))


def read_media(media: Media) -> tuple[str, bytes]:
    """(file name, bytes) of a path, bytes or an open binary file."""
    if isinstance(media, bytes):
        return "upload", media
    if isinstance(media, str | os.PathLike):
        path = Path(media)
        return path.name, path.read_bytes()
    if isinstance(media, io.IOBase) or hasattr(media, "read"):
        return Path(getattr(media, "name", "upload")).name, media.read()
    raise TypeError(f"media must be a path, bytes or a binary file, not {type(media).__name__}")


class _Base:
    """What both clients share: building requests, reading answers, the retry policy."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int,
                 backoff_s: float, max_backoff_s: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _request(self, endpoint: str, media: Media, params: dict[str, Any],
                 timeout: float | None) -> dict[str, Any]:
        name, data = read_media(media)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        timeout = self.timeout if timeout is None else timeout
        # The server's deadline is the call's: it stops working when the caller stops
        # waiting. The HTTP timeout leaves room for the upload and the answer.
        query = {k: _param(v) for k, v in params.items() if v is not None}
        query.setdefault("timeout_s", timeout)
        return {"method": "POST", "url": f"{self.url}/{endpoint}", "params": query,
                "files": {"file": (name, data, content_type)}, "headers": self.headers,
                "timeout": timeout + 30}

    def _delay(self, response: httpx.Response | None, attempt: int) -> float:
        """Retry-After when the server gave one, else exponential backoff with jitter."""
        if response is not None:
            try:
                return min(float(response.headers["retry-after"]), self.max_backoff_s)
            except (KeyError, ValueError):
                pass
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * random.uniform(.5, 1)

    def _retry(self, response: httpx.Response | None, attempt: int) -> bool:
        return attempt < self.retries and (response is None or response.status_code in RETRIED)

    @staticmethod
    def _parse(response: httpx.Response, schema: type[T]) -> T:
        if response.status_code >= 400:
            raise CvserveHTTPError.from_response(response)
        return schema.model_validate(response.json())

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise CvserveHTTPError.from_response(response)
        return response


def _param(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


class Client(_Base):
    """A synchronous client; safe to share between threads."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0) -> None:
        super().__init__(url, api_key, timeout, retries, backoff_s, max_backoff_s)
        self.http = httpx.Client()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, **request: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response: httpx.Response | None = self.http.request(**request)
            except httpx.ConnectError:  # never reached the server: safe to send again
                if not self._retry(None, attempt):
                    raise
                response = None
            if response is not None and not self._retry(response, attempt):
                return response
            time.sleep(self._delay(response, attempt))
            attempt += 1

    def _post(self, endpoint: str, media: Media, timeout: float | None,
              params: dict[str, Any]) -> httpx.Response:
        return self._send(**self._request(endpoint, media, params, timeout))

    # --- tasks -------------------------------------------------------------------------
    def detect(self, image: Media, model: str | None = None, *, timeout: float | None = None,
               **options: Any) -> DetectResponse:
        """Boxes (and masks for instance models). Options: score_threshold, max_detections,
        mask_format."""
        return self._parse(self._post("detect", image, timeout, {"model": model, **options}),
                           DetectResponse)

    def segment(self, image: Media, model: str | None = None, *, timeout: float | None = None,
                **options: Any) -> SegmentResponse:
        return self._parse(self._post("segment", image, timeout, {"model": model, **options}),
                           SegmentResponse)

    def explain(self, media: Media, model: str | None = None, *, timeout: float | None = None,
                **options: Any) -> ExplainResponse:
        """Options: method, target, layer, and the method's own (README "Explanations")."""
        return self._parse(self._post("explain", media, timeout, {"model": model, **options}),
                           ExplainResponse)

    def classify_video(self, video: Media, model: str | None = None, *,
                       timeout: float | None = None, progress: Progress | None = None,
                       poll_s: float = 0.5, **options: Any) -> ClassifyVideoResponse:
        """Labels (and with localize=True, action segments). A video the server runs as a
        job (long ones, or async=True) is waited for, `progress(done, total)` called as
        its clips are run; `timeout` bounds the whole wait."""
        params = {"model": model, **options}
        if "async_" in params:
            params["async"] = params.pop("async_")
        response = self._check(self._post("classify-video", video, timeout, params))
        if response.status_code != 202:
            return self._parse(response, ClassifyVideoResponse)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        job_id = response.json()["job_id"]
        while True:
            status = self.job(job_id)
            if progress is not None:
                progress(status.progress.done, status.progress.total)
            if status.status in ("done", "failed"):
                return _job_result(status, ClassifyVideoResponse)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done: {status.status}")
            time.sleep(poll_s)

    def render(self, endpoint: str, media: Media, model: str | None = None, *,
               timeout: float | None = None, **options: Any) -> bytes:
        """The PNG rendering of /detect, /segment or /explain (boxes, masks, heatmaps)."""
        params = {"model": model, "format": "png", **options}
        return self._check(self._post(endpoint, media, timeout, params)).content

    # --- the service -------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return ModelList.model_validate(self._get("/models")).models

    def model(self, name: str) -> ModelInfo:
        return ModelInfo.model_validate(self._get(f"/models/{name}"))

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._get(f"/jobs/{job_id}"))

    def ready(self) -> bool:
        try:
            return self.http.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _get(self, path: str) -> Any:
        return self._check(self._send(method="GET", url=f"{self.url}{path}",
                                      headers=self.headers, timeout=self.timeout)).json()


class AsyncClient(_Base):
    """The same as coroutines: `async with AsyncClient(url) as c: await c.detect(...)`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0) -> None:
        super().__init__(url, api_key, timeout, retries, backoff_s, max_backoff_s)
        self.http = httpx.AsyncClient()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, **request: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response: httpx.Response | None = await self.http.request(**request)
            except httpx.ConnectError:
                if not self._retry(None, attempt):
                    raise
                response = None
            if response is not None and not self._retry(response, attempt):
                return response
            await asyncio.sleep(self._delay(response, attempt))
            attempt += 1

    async def _post(self, endpoint: str, media: Media, timeout: float | None,
                    params: dict[str, Any]) -> httpx.Response:
        return await self._send(**self._request(endpoint, media, params, timeout))

    async def detect(self, image: Media, model: str | None = None, *,
                     timeout: float | None = None, **options: Any) -> DetectResponse:
        return self._parse(await self._post("detect", image, timeout,
                                            {"model": model, **options}), DetectResponse)

    async def segment(self, image: Media, model: str | None = None, *,
                      timeout: float | None = None, **options: Any) -> SegmentResponse:
        return self._parse(await self._post("segment", image, timeout,
                                            {"model": model, **options}), SegmentResponse)

    async def explain(self, media: Media, model: str | None = None, *,
                      timeout: float | None = None, **options: Any) -> ExplainResponse:
        return self._parse(await self._post("explain", media, timeout,
                                            {"model": model, **options}), ExplainResponse)

    async def classify_video(self, video: Media, model: str | None = None, *,
                             timeout: float | None = None,
                             progress: Callable[[int, int | None], Awaitable[Any] | Any] | None
                             = None, poll_s: float = 0.5,
                             **options: Any) -> ClassifyVideoResponse:
        params = {"model": model, **options}
        if "async_" in params:
            params["async"] = params.pop("async_")
        response = self._check(await self._post("classify-video", video, timeout, params))
        if response.status_code != 202:
            return self._parse(response, ClassifyVideoResponse)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        job_id = response.json()["job_id"]
        while True:
            status = await self.job(job_id)
            if progress is not None:
                shown = progress(status.progress.done, status.progress.total)
                if asyncio.iscoroutine(shown):
                    await shown
            if status.status in ("done", "failed"):
                return _job_result(status, ClassifyVideoResponse)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done: {status.status}")
            await asyncio.sleep(poll_s)

    async def render(self, endpoint: str, media: Media, model: str | None = None, *,
                     timeout: float | None = None, **options: Any) -> bytes:
        params = {"model": model, "format": "png", **options}
        return self._check(await self._post(endpoint, media, timeout, params)).content

    async def models(self) -> list[ModelInfo]:
        return ModelList.model_validate(await self._get("/models")).models

    async def model(self, name: str) -> ModelInfo:
        return ModelInfo.model_validate(await self._get(f"/models/{name}"))

    async def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(await self._get(f"/jobs/{job_id}"))

    async def _get(self, path: str) -> Any:
        return self._check(await self._send(method="GET", url=f"{self.url}{path}",
                                            headers=self.headers,
                                            timeout=self.timeout)).json()


def _job_result(status: JobStatus, schema: type[T]) -> T:
    if status.status == "failed" or status.result is None:
        error = status.error
        code = error.code if error else "job_failed"
        message = error.message if error else "the job ended without a result"
        raise CvserveHTTPError(from_code(code, message).status, code, message)
    return schema.model_validate(status.result)
