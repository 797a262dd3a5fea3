"""The one typed error family; app/api.py maps it to HTTP in one place.

Errors cross the queue as (code, message) pairs, so a worker's InputError reaches the
client as the same JSON the api would have written itself.
"""

from __future__ import annotations


class CvserveError(Exception):
    """Base: a machine-readable `code`, an HTTP `status` and a message for people."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InputError(CvserveError):
    """A bad parameter or a malformed request."""

    status = 400
    code = "bad_request"


class UnsupportedMedia(CvserveError):
    """Not an image or video we can decode (or a truncated / corrupt one)."""

    status = 415
    code = "unsupported_media"


class PayloadTooLarge(CvserveError):
    """Over an upload or pixel limit."""

    status = 413
    code = "payload_too_large"


class ModelNotFound(CvserveError):
    status = 404
    code = "model_not_found"


class JobNotFound(CvserveError):
    status = 404
    code = "job_not_found"


class Overloaded(CvserveError):
    """Queue full or no live worker: the client should retry after `retry_after_s`."""

    status = 503
    code = "overloaded"


class Unauthorized(CvserveError):
    """No API key, or not one of the service's (app/auth.py)."""

    status = 401
    code = "unauthorized"


class RateLimited(CvserveError):
    """Over the key's requests a minute: retry after `retry_after_s`."""

    status = 429
    code = "rate_limited"


class DeadlineExceeded(CvserveError):
    status = 504
    code = "deadline_exceeded"


class BackendError(CvserveError):
    """The model failed on input that passed validation; the job is not retried."""

    status = 500
    code = "backend_error"


class JobFailed(CvserveError):
    """The job was delivered `max_deliveries` times without an answer (dead-lettered)."""

    status = 500
    code = "job_failed"


_BY_CODE: dict[str, type[CvserveError]] = {
    cls.code: cls
    for cls in (InputError, UnsupportedMedia, PayloadTooLarge, ModelNotFound, JobNotFound,
                Overloaded, DeadlineExceeded, BackendError, JobFailed)
}


def from_code(code: str, message: str) -> CvserveError:
    """Rebuild an error that crossed the queue as (code, message)."""
    return _BY_CODE.get(code, BackendError)(message)
