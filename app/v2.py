"""The Open Inference Protocol (KServe v2), REST side; app/v2_grpc.py is the gRPC side.
Both call `OpenInference`, which turns a v2 request into the same jobs /detect sends
(docs/design.md §9 "Open Inference Protocol").

Two ways in: raw tensors for the model's own inputs (a "tensors" job, run by the worker
on the backend alone, batched with other requests of the same shapes), or one BYTES
tensor of encoded images (videos for a video model), each element sent through the
model's task pipeline as its own job, as /detect, /segment, /classify-video or /explain
would send it, with the answers packed as tensors: detections as padded boxes / scores /
classes / labels and a count, label maps, top classes, heatmaps.

No NumPy here (the api image has none): tensors cross as little-endian bytes, and JSON
`data` is packed and unpacked with `struct`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import struct
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from prometheus_client import Counter
from pydantic import BaseModel

from .errors import CvserveError, InputError
from .media import VideoLimits, probe_image, probe_video
from .schemas import ModelInfo
from .settings import Settings
from .uploads import read_body

VERSION = "1"  # each model has one version; "1" is its name in paths and answers
FORMATS = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
           "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f",
           "FP64": "d"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
VIDEO_TASKS = ("video-classification", "temporal-localization")
HEADER = "Inference-Header-Content-Length"

V2_REQUESTS = Counter("cvserve_v2_inference_requests", "Open Inference Protocol infer "
                      "requests by model, protocol (rest, grpc) and outcome", ["model",
                                                                               "protocol",
                                                                               "outcome"])


@dataclass
class Tensor:
    """One tensor on the wire: contents row-major, little-endian; BYTES elements each
    prefixed by their length (4 bytes, little-endian), as the protocol's binary form."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def byte_size(datatype: str, count: int) -> int:
    return struct.calcsize(f"<{count}{FORMATS[datatype]}")


def pack(datatype: str, values: list[Any]) -> bytes:
    """JSON `data` (already flattened) into the binary form."""
    if datatype == "BYTES":
        out = []
        for v in values:
            if not isinstance(v, str | bytes):
                raise InputError(f"BYTES data holds strings, got {type(v).__name__}")
            raw = v.encode() if isinstance(v, str) else v
            out.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(out)
    try:
        return struct.pack(f"<{len(values)}{FORMATS[datatype]}", *values)
    except (struct.error, TypeError) as exc:
        raise InputError(f"data does not fit datatype {datatype}: {exc}") from exc


def unpack(datatype: str, data: bytes) -> list[Any]:
    """The binary form as JSON `data` (flat, as Triton answers)."""
    if datatype == "BYTES":
        return [e.decode(errors="replace") for e in split_bytes(data)]
    size = struct.calcsize(FORMATS[datatype])
    return list(struct.unpack(f"<{len(data) // size}{FORMATS[datatype]}", data))


def split_bytes(data: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(data):
        if i + 4 > len(data):
            raise InputError("BYTES tensor: a length prefix is cut short")
        (n,) = struct.unpack_from("<I", data, i)
        if i + 4 + n > len(data):
            raise InputError(f"BYTES tensor: an element of {n} bytes is cut short")
        items.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return items


def flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(flatten(item))
    return out


class V2Error(Exception):
    """A protocol error: {"error": message} with an HTTP status (and a gRPC code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    @classmethod
    def of(cls, err: CvserveError) -> V2Error:
        return cls(err.status, err.message)


Submit = Callable[[ModelInfo, dict[str, Any], bytes, float | None, str | None],
                  Awaitable[tuple[dict, bytes | None]]]


class OpenInference:
    """What both protocols answer, over the api's model directory and job queue."""

    def __init__(self, settings: Settings, models: Callable[[], Awaitable[dict[str,
                                                                               ModelInfo]]],
                 ping: Callable[[], Awaitable[bool]], submit: Submit) -> None:
        self.settings = settings
        self.models = models
        self.ping = ping
        self.submit = submit

    async def ready(self) -> bool:
        try:
            return await self.ping() and bool(await self.models())
        except CvserveError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "cvserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    async def model(self, name: str, version: str = "") -> ModelInfo:
        try:
            models = await self.models()
        except CvserveError as err:  # the queue is down: 503
            raise V2Error.of(err) from err
        if name not in models:
            raise V2Error(404, f"unknown model '{name}' (served: {', '.join(models) or 'none'})")
        if version not in ("", VERSION):
            raise V2Error(404, f"model '{name}' has no version '{version}' (versions: "
                               f"{VERSION})")
        return models[name]

    async def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        info = await self.model(name, version)
        tensors = info.tensors or {}
        return {"name": info.name, "versions": [VERSION],
                "platform": PLATFORMS.get(info.backend, info.backend),
                "inputs": tensors.get("inputs", []), "outputs": tensors.get("outputs", [])}

    async def infer(self, name: str, version: str, inputs: list[Tensor],
                    outputs: list[str] | None, parameters: dict[str, Any],
                    protocol: str) -> list[Tensor]:
        outcome = "error"
        try:
            info = await self.model(name, version)
            if not inputs:
                raise V2Error(400, "the request has no inputs")
            for t in inputs:
                if t.datatype != "BYTES" and t.datatype not in FORMATS:
                    raise V2Error(400, f"input {t.name}: unknown datatype {t.datatype}")
                if any(d < 0 for d in t.shape):
                    raise V2Error(400, f"input {t.name}: negative dimension in {t.shape}")
                if t.datatype != "BYTES" and len(t.data) != byte_size(t.datatype, t.count):
                    raise V2Error(400, f"input {t.name}: shape {t.shape} of {t.datatype} "
                                       f"takes {byte_size(t.datatype, t.count)} bytes, got "
                                       f"{len(t.data)}")
            timeout = _timeout_s(parameters)
            if len(inputs) == 1 and inputs[0].datatype == "BYTES":
                answer = await self._pipeline(info, inputs[0], outputs, parameters, timeout)
            else:
                answer = await self._tensors(info, inputs, outputs, timeout)
            outcome = "ok"
            return answer
        except CvserveError as err:
            outcome = err.code
            raise V2Error.of(err) from err
        finally:
            V2_REQUESTS.labels(name, protocol, outcome).inc()

    async def _tensors(self, info: ModelInfo, inputs: list[Tensor],
                       outputs: list[str] | None, timeout: float | None) -> list[Tensor]:
        if any(t.datatype == "BYTES" for t in inputs):
            raise V2Error(400, "a BYTES input (encoded images) must be the request's only "
                               "input")
        params = {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape}
                             for t in inputs], "outputs": outputs}
        result, body = await self.submit(info, params, b"".join(t.data for t in inputs),
                                         timeout, "tensors")
        out, offset, body = [], 0, body or b""
        for spec in result["outputs"]:
            size = byte_size(spec["datatype"], math.prod(spec["shape"]))
            out.append(Tensor(spec["name"], spec["datatype"], spec["shape"],
                              body[offset:offset + size]))
            offset += size
        return out

    async def _pipeline(self, info: ModelInfo, tensor: Tensor, outputs: list[str] | None,
                        parameters: dict[str, Any], timeout: float | None) -> list[Tensor]:
        """Encoded images (or videos) through the model's own task pipeline, one job each
        (they batch in the worker like any others), the answers packed as tensors."""
        if info.task not in PIPELINES:
            names = [t["name"] for t in (info.tensors or {}).get("inputs", [])]
            raise V2Error(400, f"model '{info.name}' is a {info.task} model: send it raw "
                               f"tensors ({', '.join(names)})")
        items = split_bytes(tensor.data)
        if len(items) != tensor.count or len(tensor.shape) != 1:
            raise V2Error(400, f"input {tensor.name}: expected shape [N] holding N encoded "
                               f"files; shape {tensor.shape} holds {len(items)} elements")
        video = info.task in VIDEO_TASKS
        for i, item in enumerate(items):  # 413 / 415 before anything is queued
            try:
                if video:
                    await asyncio.to_thread(probe_video, item,
                                            VideoLimits.from_settings(self.settings))
                else:
                    probe_image(item, self.settings.image_pixels)
            except CvserveError as err:
                raise V2Error(err.status, f"{tensor.name}[{i}]: {err.message}") from err
        params = PIPELINES[info.task](parameters)
        answers = await asyncio.gather(*(self.submit(info, params, item, timeout, None)
                                         for item in items))
        made = PACKERS[info.task]([result for result, _ in answers])
        if outputs:
            by_name = {t.name: t for t in made}
            unknown = set(outputs) - set(by_name)
            if unknown:
                raise V2Error(400, f"no output {sorted(unknown)}; a BYTES request to a "
                                   f"{info.task} model answers {list(by_name)}")
            made = [by_name[name] for name in outputs]  # in the order asked
        return made


# --- the task pipelines behind a BYTES input ---------------------------------------------
def _pick(parameters: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: parameters[k] for k in names if k in parameters}


PIPELINES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # A job's params, per model task, from the request's parameters: as the task
    # endpoint would send them.
    "detection": lambda p: _pick(p, "score_threshold", "max_detections"),
    "instance-segmentation": lambda p: _pick(p, "score_threshold", "max_detections"),
    "semantic-segmentation": lambda p: {"mask_format": "png"},
    "video-classification": lambda p: _pick(p, "top_k", "num_clips"),
    "temporal-localization": lambda p: _pick(p, "top_k", "num_clips"),
    # An image classifier's jobs are explanations (/explain): top classes and a heatmap.
    "classification": lambda p: {"method": p.get("method", "gradcam"),
                                 **_pick(p, "target", "layer", "top_k")},
}


def _pad(rows: list[list[Any]], width: int, fill: Any) -> list[Any]:
    return [v for row in rows for v in row + [fill] * (width - len(row))]


def _ranked(results: list[list[dict[str, Any]]], prefix: str = "") -> list[Tensor]:
    """Per item a list of {label, class_id, score}: padded scores, classes, labels."""
    n, k = len(results), max((len(r) for r in results), default=0)
    return [Tensor(f"{prefix}scores", "FP32", [n, k],
                   pack("FP32", _pad([[c["score"] for c in r] for r in results], k, 0.0))),
            Tensor(f"{prefix}classes", "INT32", [n, k],
                   pack("INT32", _pad([[c["class_id"] for c in r] for r in results], k, -1))),
            Tensor(f"{prefix}labels", "BYTES", [n, k],
                   pack("BYTES", _pad([[c["label"] for c in r] for r in results], k, "")))]


def _detections(results: list[dict[str, Any]]) -> list[Tensor]:
    """boxes [N, K, 4] (x1, y1, x2, y2, original pixels), scores, classes (-1: padding),
    labels, count: K is the most detections in any image."""
    found = [r["detections"] for r in results]
    n, k = len(found), max((len(d) for d in found), default=0)
    boxes = _pad([[v for d in dets for v in (d["box"]["x1"], d["box"]["y1"], d["box"]["x2"],
                                               d["box"]["y2"])] for dets in found], 4 * k, 0.0)
    return [Tensor("boxes", "FP32", [n, k, 4], pack("FP32", boxes)), *_ranked(found),
            Tensor("count", "INT32", [n], pack("INT32", [len(d) for d in found]))]


def _label_maps(results: list[dict[str, Any]]) -> list[Tensor]:
    """label_map INT32 [N, H, W] (class ids; -1 pads images smaller than the largest) and
    each image's size [N, 2] (height, width). The worker's palette PNG, decoded here with
    Pillow (8-bit for up to 256 classes, 16-bit beyond)."""
    maps = []
    for r in results:
        with Image.open(io.BytesIO(base64.b64decode(r["label_map"]["data"]))) as im:
            ids = array("i", im.getdata())  # palette indices or 16-bit values: class ids
            maps.append((im.height, im.width, ids))
    h = max(m[0] for m in maps)
    w = max(m[1] for m in maps)
    out = array("i")
    for mh, mw, ids in maps:
        for y in range(mh):
            out.extend(ids[y * mw:(y + 1) * mw])
            out.extend([-1] * (w - mw))
        out.extend([-1] * (w * (h - mh)))
    if sys.byteorder == "big":
        out.byteswap()
    return [Tensor("label_map", "INT32", [len(maps), h, w], out.tobytes()),
            Tensor("size", "INT32", [len(maps), 2],
                   pack("INT32", [v for mh, mw, _ in maps for v in (mh, mw)]))]


def _videos(results: list[dict[str, Any]]) -> list[Tensor]:
    return _ranked([r["top"] for r in results])


def _explanations(results: list[dict[str, Any]]) -> list[Tensor]:
    """The top classes, and each image's heatmap [N, h, w] in [0, 1] (0 pads a smaller
    grid) with the region of the image it covers [N, 4] (x1, y1, x2, y2)."""
    grids = [r["heatmap"] for r in results]
    h = max(g["shape"][0] for g in grids)
    w = max(g["shape"][1] for g in grids)
    rows = [[v for row in g["data"] for v in row + [0.0] * (w - len(row))]
            + [0.0] * (w * (h - g["shape"][0])) for g in grids]
    return [*_ranked([r["top"] for r in results]),
            Tensor("heatmap", "FP32", [len(grids), h, w], pack("FP32", _pad(rows, h * w, 0.0))),
            Tensor("region", "FP32", [len(grids), 4],
                   pack("FP32", [v for g in grids for v in g["region"]]))]


PACKERS: dict[str, Callable[[list[dict[str, Any]]], list[Tensor]]] = {
    "detection": _detections, "instance-segmentation": _detections,
    "semantic-segmentation": _label_maps, "video-classification": _videos,
    "temporal-localization": _videos, "classification": _explanations,
}


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    """The protocol's `timeout` parameter is in microseconds (Triton's convention)."""
    value = parameters.get("timeout")
    if value in (None, 0):
        return None
    try:
        return float(value) / 1e6
    except (TypeError, ValueError) as exc:
        raise V2Error(400, f"parameter timeout must be microseconds, got {value!r}") from exc


# --- REST ---------------------------------------------------------------------------------
def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, list[Tensor]]:
    """The JSON header and its inputs; binary contents follow the header, in input order,
    when Inference-Header-Content-Length says where the header ends."""
    try:
        split = int(header_length) if header_length is not None else len(body)
        if not 0 <= split <= len(body):
            raise ValueError(split)
        request = json.loads(body[:split])
    except (ValueError, RecursionError) as exc:
        raise V2Error(400, f"the request header is not JSON (or {HEADER} is wrong): "
                           f"{exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise V2Error(400, "the request must be a JSON object with a list of `inputs`")
    if not isinstance(request.get("parameters") or {}, dict) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str)
            and isinstance(o.get("parameters") or {}, dict)
            for o in request.get("outputs") or []):
        raise V2Error(400, "`parameters` must be an object and `outputs` a list of "
                           "{name, parameters}")
    binary, offset, inputs = body[split:], 0, []
    for raw in request["inputs"]:
        try:
            name, datatype = str(raw["name"]), str(raw["datatype"])
            shape = [int(d) for d in raw["shape"]]
            params = dict(raw.get("parameters") or {})
            size = int(params.get("binary_data_size", -1))
        except (KeyError, TypeError, ValueError) as exc:
            raise V2Error(400, f"each input needs name, datatype, shape (and optional "
                               f"parameters): {exc!r}") from exc
        if size >= 0:
            if offset + size > len(binary):
                raise V2Error(400, f"input {name}: binary_data_size {size} runs past the "
                                   "body")
            data, offset = binary[offset:offset + size], offset + size
        elif "data" in raw:
            if datatype != "BYTES" and datatype not in FORMATS:
                raise V2Error(400, f"input {name}: unknown datatype {datatype}")
            try:
                values = flatten(raw["data"])
            except RecursionError as exc:
                raise V2Error(400, f"input {name}: data nested too deep") from exc
            if len(values) != math.prod(shape):
                raise V2Error(400, f"input {name}: shape {shape} takes {math.prod(shape)} "
                                   f"values, data has {len(values)}")
            data = pack(datatype, values)
        else:
            raise V2Error(400, f"input {name} has neither data nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return request, inputs


def render_response(model: str, request: dict, outputs: list[Tensor]) -> Response:
    """JSON `data`, or binary after the header for the outputs asked that way (per output
    `binary_data`, or `binary_data_output` for all)."""
    wanted = {o["name"]: (o.get("parameters") or {}) for o in request.get("outputs") or []}
    all_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    described, chunks = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if wanted.get(t.name, {}).get("binary_data", all_binary):
            entry["parameters"] = {"binary_data_size": len(t.data)}
            chunks.append(t.data)
        else:
            entry["data"] = unpack(t.datatype, t.data)
        described.append(entry)
    header = {"model_name": model, "model_version": VERSION, "outputs": described}
    if "id" in request:
        header["id"] = request["id"]
    text = json.dumps(header).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER: str(len(text))})


class ErrorBody(BaseModel):
    """The protocol's error answer."""

    error: str


EMPTY = {"description": "Yes (no body)", "content": None}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 429, 503, 504)}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def router(core: OpenInference, settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

    @api.get("")
    async def server_metadata() -> JSONResponse:
        return JSONResponse(core.server_metadata())

    @api.get("/health/live", response_class=Response, responses={200: EMPTY})
    async def live() -> Response:
        return Response(status_code=200)

    @api.get("/health/ready", response_class=Response,
             responses={200: EMPTY, 503: {"model": ErrorBody}})
    async def ready() -> Response:
        if await core.ready():
            return Response(status_code=200)
        return error(503, "not ready: no live worker serves a model, or the queue is down")

    async def metadata(name: str, version: str) -> JSONResponse:
        try:
            return JSONResponse(await core.metadata(name, version))
        except V2Error as err:
            return error(err.status, err.message)

    async def model_ready(name: str, version: str) -> Response:
        try:
            await core.model(name, version)
        except V2Error as err:
            return error(err.status, err.message)
        return Response(status_code=200)

    async def infer(request: Request, name: str, version: str) -> Response:
        t0 = time.perf_counter()
        try:
            body = await read_body(request, settings.upload_bytes)
            parsed, inputs = parse_request(body, request.headers.get(HEADER))
            asked = [str(o["name"]) for o in parsed.get("outputs") or []] or None
            outputs = await core.infer(name, version, inputs, asked,
                                       parsed.get("parameters") or {}, "rest")
        except V2Error as err:
            return error(err.status, err.message)
        except CvserveError as err:  # e.g. the body over the upload limit
            return error(err.status, err.message)
        response = render_response(name, parsed, outputs)
        response.headers["x-cvserve-total-ms"] = f"{(time.perf_counter() - t0) * 1000:.2f}"
        return response

    # Each route twice, with and without /versions/{version}: the unversioned handlers
    # pass "" (the only version, "1").
    async def metadata_any(name: str) -> JSONResponse:
        return await metadata(name, "")

    async def ready_any(name: str) -> Response:
        return await model_ready(name, "")

    async def infer_any(request: Request, name: str) -> Response:
        return await infer(request, name, "")

    for prefix, handlers in (("/models/{name}", (metadata_any, ready_any, infer_any)),
                             ("/models/{name}/versions/{version}",
                              (metadata, model_ready, infer))):
        get_meta, get_ready, post_infer = handlers
        api.add_api_route(prefix, get_meta, methods=["GET"], responses=ERROR_RESPONSES)
        api.add_api_route(f"{prefix}/ready", get_ready, methods=["GET"],
                          response_class=Response, responses={200: EMPTY, **ERROR_RESPONSES})
        api.add_api_route(f"{prefix}/infer", post_infer, methods=["POST"],
                          responses={200: {"content": {"application/json": {},
                                                       "application/octet-stream": {}}},
                                     **ERROR_RESPONSES}, openapi_extra=INFER_BODY)
    return api
