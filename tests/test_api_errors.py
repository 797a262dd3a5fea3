"""Bad input gets a clear JSON error with the right status, and never hurts the worker."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cvserve.models.synthetic import make_scene

from .conftest import Service, embedded_service

UPLOAD_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def service(random_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"CVSERVE_MODEL_REPOSITORY": str(random_repo),
           "CVSERVE_UPLOAD_BYTES": str(UPLOAD_LIMIT), "CVSERVE_IMAGE_PIXELS": "4000000"}
    with embedded_service(env, tmp_path_factory.mktemp("logs")) as svc:
        yield svc


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg(seed: int = 1) -> bytes:
    return make_scene(seed, 320, 240).jpeg()


def corrupt_jpeg() -> bytes:
    data = bytearray(jpeg())
    data[300:2000] = bytes(range(256)) * 6 + bytes(1700 - 1536)  # garbage entropy data
    return bytes(data)


def post(svc: Service, data: bytes, content_type: str = "image/jpeg", **params: object
         ) -> httpx.Response:
    return httpx.post(f"{svc.url}/detect", params=params, timeout=60,
                      files={"file": ("upload", data, content_type)})


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.mark.parametrize("name,data,status,code", [
    ("empty", b"", 400, "bad_request"),
    ("text", b"hello, I am not an image", 415, "unsupported_media"),
    ("truncated jpeg", jpeg()[:1500], 415, "unsupported_media"),
    ("header only", jpeg()[:200], 415, "unsupported_media"),
    ("decompression bomb", png_header_only(30000, 30000), 413, "payload_too_large"),
    ("pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_media"),
])
def test_bad_upload_is_a_4xx_json_error(service: Service, name: str, data: bytes,
                                        status: int, code: str) -> None:
    assert_error(post(service, data), status, code)


def test_corrupt_jpeg_is_refused_or_decoded_never_a_500(service: Service) -> None:
    r = post(service, corrupt_jpeg())
    # libjpeg may decode garbage entropy data as (wrong) pixels; either way: no 5xx.
    assert r.status_code in (200, 415), r.text


def test_upload_over_the_limit_is_413(service: Service) -> None:
    big = io.BytesIO()
    Image.effect_noise((1200, 1200), 64).convert("RGB").save(big, format="PNG")
    assert len(big.getvalue()) > UPLOAD_LIMIT
    assert_error(post(service, big.getvalue(), "image/png"), 413, "payload_too_large")
    raw = httpx.post(f"{service.url}/detect", content=big.getvalue(),
                     headers={"content-type": "image/png"}, timeout=60)
    assert_error(raw, 413, "payload_too_large")


@pytest.mark.parametrize("params,status,code", [
    ({"score_threshold": 2}, 400, "bad_request"),
    ({"score_threshold": "abc"}, 400, "bad_request"),
    ({"max_detections": 0}, 400, "bad_request"),
    ({"format": "gif"}, 400, "bad_request"),
    ({"timeout_s": 100000}, 400, "bad_request"),
    ({"model": "no-such-model"}, 404, "model_not_found"),
])
def test_bad_parameter_is_a_4xx_json_error(service: Service, params: dict, status: int,
                                           code: str) -> None:
    assert_error(post(service, jpeg(), **params), status, code)


def test_multipart_without_a_file_part_is_400(service: Service) -> None:
    r = httpx.post(f"{service.url}/detect", data={"score_threshold": "0.5"},
                   files={"image": ("x.jpg", jpeg(), "image/jpeg")}, timeout=60)
    assert_error(r, 400, "bad_request")


def test_unknown_route_and_method_use_the_error_shape(service: Service) -> None:
    assert_error(httpx.get(f"{service.url}/nope"), 404, "not_found")
    assert_error(httpx.get(f"{service.url}/detect"), 405, "method_not_allowed")


def test_worker_survives_bad_input_and_serves_the_next_request(service: Service) -> None:
    for data in (b"", corrupt_jpeg(), jpeg()[:1500], png_header_only(30000, 30000)):
        assert post(service, data).status_code < 500
    r = post(service, jpeg(7), score_threshold=0)
    assert r.status_code == 200 and r.json()["detections"]
