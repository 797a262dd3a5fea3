"""Reading an upload (multipart `file` or raw body) without ever holding more than the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .errors import InputError, PayloadTooLarge


async def read_body(request: Request, limit: int, setting: str = "CVSERVE_UPLOAD_BYTES") -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (`setting`)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload is {declared} bytes; the limit is {limit} ({setting})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes "
                                  "(CVSERVE_UPLOAD_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, limit: int, setting: str = "CVSERVE_UPLOAD_BYTES",
                      ) -> tuple[bytes, dict[str, str]]:
    """The uploaded file's bytes and any form fields (which act like query parameters)."""
    body = await read_body(request, limit, setting)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return body, {}

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=50,
                                     max_part_size=64 * 1024).parse()
    except MultiPartException as exc:
        raise InputError(f"malformed multipart body: {exc.message}") from exc
    fields: dict[str, str] = {}
    data = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key == "file":
                data = await value.read()
            await value.close()
        else:
            fields[key] = value
    if data is None:
        raise InputError("multipart body has no `file` part; send the image or video as "
                         "`file`")
    return data, fields
