"""A corpus of malformed and unusual media, generated here, sent to every endpoint that
takes media: malformed files get a 4xx with the JSON error shape, unusual but valid ones
are served, the worker survives, and the next good request succeeds."""

from __future__ import annotations

import io
import select
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from cvserve.models.synthetic import make_scene
from cvserve.models.synthetic_video import make_action_video

from .conftest import Service, embedded_service

UPLOAD_BYTES = 8 * 1024 * 1024
IMAGE_ENDPOINTS = {"/detect": {}, "/segment": {}, "/explain": {"model": "resnet18",
                                                               "method": "cam"}}
VIDEO_ENDPOINTS = {"/classify-video": {}, "/explain": {"model": "demo-actions"}}


@pytest.fixture(scope="module")
def service(every_task_repo: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    env = {"CVSERVE_MODEL_REPOSITORY": str(every_task_repo),
           "CVSERVE_AUTO_BUILD_DEFAULT": "false", "CVSERVE_UPLOAD_BYTES": str(UPLOAD_BYTES),
           "CVSERVE_IMAGE_PIXELS": "20000000", "CVSERVE_VIDEO_MAX_DURATION_S": "8",
           "CVSERVE_VIDEO_UPLOAD_BYTES": str(UPLOAD_BYTES)}
    with embedded_service(env, tmp_path_factory.mktemp("bad-input-logs")) as svc:
        yield svc


# --- the corpus ---------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def scene(width: int = 320, height: int = 240) -> Image.Image:
    return make_scene(7, width, height).image


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def corrupted(data: bytes, start: int, length: int) -> bytes:
    out = bytearray(data)
    out[start:start + length] = bytes((b ^ 0x5A) for b in out[start:start + length])
    return bytes(out)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show upright
    return encoded(scene(), "JPEG", exif=exif)


def audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


JPEG = encoded(scene(), "JPEG")
PNG = encoded(scene(), "PNG")
MP4 = make_action_video(3, 3.0).mp4()

BAD_IMAGES: dict[str, Callable[[], bytes]] = {
    "zero bytes": lambda: b"",
    "text": lambda: b"just some text, not an image",
    "truncated jpeg": lambda: JPEG[:len(JPEG) // 3],
    "jpeg header only": lambda: JPEG[:300],
    "corrupted jpeg entropy data": lambda: corrupted(JPEG, 700, 4000),
    "truncated png": lambda: PNG[:len(PNG) // 2],
    "png with a broken IDAT": lambda: corrupted(PNG, 100, 2000),
    "truncated webp": lambda: (w := encoded(scene(), "WEBP"))[:len(w) // 2],
    "truncated gif": lambda: (g := encoded(scene(), "GIF"))[:len(g) // 2],
    "decompression bomb": lambda: png_claiming(60000, 60000),
    "pdf": lambda: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n",
    "a video sent as an image": lambda: MP4,
    # Small, but resized for a model it would be 512 x 0 (a detector) or 520 x 1,560,000
    # (a segmenter: gigabytes of floats). Refused, not a crash.
    "30000x10": lambda: encoded(Image.new("RGB", (30000, 10), (20, 200, 30)), "PNG"),
}
GOOD_IMAGES: dict[str, Callable[[], bytes]] = {
    "1x1": lambda: encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
    "cmyk jpeg": lambda: encoded(scene().convert("CMYK"), "JPEG"),
    "16-bit png": lambda: encoded(scene().convert("L").convert("I;16"), "PNG"),
    "palette png": lambda: encoded(scene().convert("P"), "PNG"),
    "png with alpha": lambda: encoded(scene().convert("RGBA"), "PNG"),
    "exif-rotated jpeg": exif_rotated,
    "jpeg with a zip appended (polyglot)": lambda: JPEG + b"PK\x03\x04" + b"\x00" * 200,
}
BAD_VIDEOS: dict[str, Callable[[], bytes]] = {
    "zero bytes": lambda: b"",
    "corrupt mp4": lambda: MP4[:40] + bytes(range(256)) * 20,
    "truncated mp4": lambda: MP4[:len(MP4) // 4],
    "no video stream": audio_only_mp4,
    "over the duration limit": lambda: make_action_video(4, 12.0).mp4(),
    "an image sent as a video": lambda: JPEG,
}


def post(svc: Service, endpoint: str, data: bytes, params: dict,
         content_type: str = "application/octet-stream") -> httpx.Response:
    return httpx.post(f"{svc.url}{endpoint}", params={**params, "timeout_s": 60},
                      files={"file": ("upload", data, content_type)}, timeout=120)


def assert_error(r: httpx.Response, what: str) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], (
        what, body)


def assert_still_serving(svc: Service, endpoint: str, params: dict, good: bytes) -> None:
    r = post(svc, endpoint, good, params)
    assert r.status_code == 200, (endpoint, r.text[:300])


@pytest.mark.parametrize("endpoint", IMAGE_ENDPOINTS)
def test_malformed_images_are_refused_and_the_worker_serves_on(service: Service,
                                                               endpoint: str) -> None:
    params = IMAGE_ENDPOINTS[endpoint]
    for what, make in BAD_IMAGES.items():
        r = post(service, endpoint, make(), params)
        assert_error(r, what)
        if what == "decompression bomb":
            assert r.status_code == 413
        if what == "zero bytes":
            assert r.status_code == 400
    assert_still_serving(service, endpoint, params, JPEG)


@pytest.mark.parametrize("endpoint", IMAGE_ENDPOINTS)
def test_unusual_but_valid_images_are_served(service: Service, endpoint: str) -> None:
    params = IMAGE_ENDPOINTS[endpoint]
    for what, make in GOOD_IMAGES.items():
        r = post(service, endpoint, make(), params)
        assert r.status_code == 200, (what, r.text[:300])
        width, height = r.json()["image"]["width"], r.json()["image"]["height"]
        if what == "exif-rotated jpeg":  # upright, as a viewer shows it
            assert (width, height) == (240, 320)
    # The content type a client claims is not trusted: the bytes decide.
    assert post(service, endpoint, JPEG, params, "text/plain").status_code == 200
    raw = httpx.post(f"{service.url}{endpoint}", params=params, content=PNG, timeout=60)
    assert raw.status_code == 200  # a raw body with no content type at all


@pytest.mark.parametrize("endpoint", VIDEO_ENDPOINTS)
def test_malformed_videos_are_refused_and_the_worker_serves_on(service: Service,
                                                               endpoint: str) -> None:
    params = VIDEO_ENDPOINTS[endpoint]
    for what, make in BAD_VIDEOS.items():
        r = post(service, endpoint, make(), params)
        if endpoint == "/explain" and what == "an image sent as a video":
            # /explain takes images too: the video model says it needs a video.
            assert r.status_code == 400, r.text
            continue
        assert_error(r, what)
        if what == "over the duration limit":
            assert r.status_code == 413
    assert_still_serving(service, endpoint, params, MP4)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_huge_streamed_body_is_refused_early(service: Service) -> None:
    """No Content-Length: 5 GB offered in 1 MiB chunks. The 413 arrives while the client is
    still sending, soon after the limit, and the service's memory does not grow with it."""
    assert service.proc is not None and service.port is not None
    before = rss_bytes(service.proc.pid)
    chunk = b"\xff" * (1 << 20)
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(b"POST /detect HTTP/1.1\r\nHost: cvserve\r\nContent-Type: image/jpeg"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        while sent < 5 * (1 << 30):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                answer = sock.recv(65536)
                break
            try:
                sock.sendall(frame)
            except OSError:  # the server closed the connection after answering
                answer = sock.recv(65536)
                break
            sent += len(chunk)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 4 * UPLOAD_BYTES, f"{sent / 2**20:.0f} MiB sent before the refusal"
    assert rss_bytes(service.proc.pid) - before < 4 * UPLOAD_BYTES
    assert_still_serving(service, "/detect", {}, JPEG)
