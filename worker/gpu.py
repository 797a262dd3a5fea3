"""The CUDA side of the worker: copy streams, pinned staging and JPEG decoding with nvjpeg.

Nothing here runs unless a model is on a CUDA device (`device` = cuda); on the CPU the
worker creates no stream, event or pinned buffer. Importing this module touches no GPU.

How a batch's host-to-device copy overlaps the previous batch's compute: the worker's
decode pool prepares the next jobs while the model thread runs the current batch
(worker/batcher.py). Work *staged* on a decode thread — the input copied into pinned
memory, sent with an asynchronous copy, preprocessed there — goes on that thread's own
stream (`side_stream`), and a `Staged` carries the event recorded after it. The model
thread's compute stream only waits for that event (`Staged.take`), so copies of batch n+1
run on the copy engines while batch n's kernels run, and neither thread blocks the other.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from cvserve.app.media import ImageInfo, probe_image
from cvserve.app.settings import Settings

from .imaging import decode_rgb

log = logging.getLogger("cvserve.gpu")

EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_PIXELS: int = Settings.model_fields["image_pixels"].default
# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec, not a dependency
# here); decode_jpeg(device="cuda") is still the GPU decoder that ships with torch.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
# warnings.catch_warnings swaps the process-wide filter list: serialize our own uses of it.
# torchvision holds a global lock around nvjpeg anyway, so this lock costs no parallelism.
_nvjpeg_lock = threading.Lock()
_local = threading.local()


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


@dataclass
class Staged:
    """Inputs on their way to the device. `ready` (CUDA only) is recorded on the stream
    that produced them; None when they are ready now (the CPU, or produced on the stream
    that will use them)."""

    tensors: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None = None

    def take(self) -> dict[str, torch.Tensor]:
        """The tensors, safe to use on the calling thread's current stream (which waits
        for `ready` on the GPU, without blocking this thread)."""
        if self.ready is None and not any(t.is_cuda for t in self.tensors.values()):
            return self.tensors
        stream = torch.cuda.current_stream()
        if self.ready is not None:
            stream.wait_event(self.ready)
        for t in self.tensors.values():
            if t.is_cuda:
                # The caching allocator tracks one stream per block; without this a tensor
                # freed after the batch could be reused by its producer's stream while this
                # stream still reads it.
                t.record_stream(stream)
        return self.tensors


def side_stream(device: str | torch.device) -> torch.cuda.Stream:
    """This thread's stream for staging work on `device` (one per thread and device, made
    on first use). Normal priority: the model's compute stream has the high-priority pool
    (worker/torchscript_backend.py), so the two can never be the same pooled stream."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    streams: dict[int, torch.cuda.Stream] = _local.__dict__.setdefault("streams", {})
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    return streams[index]


@contextmanager
def staging(device: str | torch.device) -> Iterator[None]:
    """Run the block's GPU work on this thread's side stream; no-op on the CPU."""
    if not is_cuda(device):
        yield
        return
    with torch.cuda.stream(side_stream(device)):
        yield


def record_ready() -> torch.cuda.Event:
    """An event after everything queued so far on the current stream."""
    event = torch.cuda.Event()
    event.record()
    return event


def upload(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Start an asynchronous host-to-device copy on the current stream. # same shape

    pin_memory() copies into a block of torch's caching host allocator, which hands the
    block out again only after the copies that read it have finished: a reused pinned
    staging buffer per shape, without bookkeeping of our own. A copy from pageable memory
    would make the calling thread wait for it."""
    if t.device.type != "cpu":
        return t.to(device, non_blocking=True)
    return t.pin_memory().to(device, non_blocking=True)


# --- JPEG decoding on the GPU ------------------------------------------------------------
def nvjpeg_refusal(data: bytes) -> str | None:
    """Why this upload must be decoded by Pillow, or None when nvjpeg decodes it to the same
    picture (up to IDCT rounding). Reads only the header and EXIF block, not the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            # nvjpeg decodes the stored pixels; Pillow (imaging.decode_rgb) turns them
            # upright, so only orientation 1 (or none) decodes the same both ways.
            orientation = im.getexif().get(EXIF_ORIENTATION, 1) if fmt == "JPEG" else 1
    except Exception as exc:  # anything unreadable: Pillow's path reports it properly
        return f"unreadable header ({exc})"
    if fmt != "JPEG":
        return f"not a JPEG ({fmt})"
    if mode != "RGB":  # CMYK / YCCK (Adobe) and grayscale: Pillow converts them to RGB
        return f"JPEG in mode {mode}"
    if orientation != 1:
        return f"EXIF orientation {orientation}"
    return None


def _nvjpeg(data: bytes, device: str | torch.device) -> torch.Tensor:
    """# [3, H, W] uint8 on `device`: nvjpeg on a GPU (ordered before the current stream's
    later work), libjpeg on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with _nvjpeg_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def decode_rgb_on(data: bytes, max_pixels: int, device: str | torch.device,
                  nvjpeg: bool = True) -> tuple[torch.Tensor, ImageInfo]:
    """imaging.decode_rgb, landing on `device`. # [3, H, W] uint8 on device, upright size

    With `nvjpeg`, plain RGB JPEGs are decoded by torchvision's decode_jpeg on the device
    (nvjpeg on a GPU); CMYK, grayscale, EXIF-rotated and non-JPEG uploads, and any decode
    failure, take Pillow's path, then an asynchronous copy. Call inside `staging(device)`."""
    if nvjpeg:
        info = probe_image(data, max_pixels)  # the limits first, as decode_rgb does
        reason = nvjpeg_refusal(data)
        if reason is None:
            try:
                return _nvjpeg(data, device), info
            except Exception as exc:  # nvjpeg refuses some valid files Pillow reads
                log.debug("decode_jpeg failed on a %dx%d JPEG (%s); using Pillow",
                          info.width, info.height, exc)
        else:
            log.debug("decoding with Pillow: %s", reason)
    image, info = decode_rgb(data, max_pixels)
    return (upload(image, device) if is_cuda(device) else image), info


def decode_jpeg_gpu(data: bytes, device: str | torch.device = "cuda",
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An upload decoded to upright RGB on the GPU. # [3, H, W] uint8 on `device`

    nvjpeg for plain JPEGs, Pillow (then a copy) for the rest: see decode_rgb_on."""
    with staging(device):
        image, _ = decode_rgb_on(data, max_pixels, device)
        staged = Staged({"image": image}, record_ready() if is_cuda(device) else None)
    return staged.take()["image"]  # usable on the caller's stream
