"""The model catalog: real models install from a mirror or a real HTTP download, sha256-checked,
and nothing half-written or unverified ever appears in the repository."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cvserve.models.catalog import CATALOG, CatalogEntry, CatalogError, available, install
from cvserve.models.catalog import _install as install_entry
from cvserve.worker.repository import ModelRepository, load_config

from .conftest import SHARED

MIRROR = Path(os.environ.get(
    "CVSERVE_TEST_MIRROR", SHARED / "models"))
# The label files shipped next to each model in the mirror, which the catalog's copy.
MIRROR_LABELS = {"yolox-nano": "coco_classes.txt",
                 "deeplabv3-mobilenetv2-voc": "voc_classes.txt",
                 "i3d-kinetics400": "kinetics400_labels.txt"}


@pytest.fixture
def mirror() -> Path:
    if not (MIRROR / "yolox-nano" / "yolox_nano.onnx").is_file():
        pytest.skip(f"no model mirror at {MIRROR}; set CVSERVE_TEST_MIRROR to a folder laid "
                    "out as {mirror}/{name}/{file} (like shared/models)")
    return MIRROR


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served by a real threaded HTTP server on 127.0.0.1. -> (folder, base URL)"""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def served_entry(http_root: tuple[Path, str], payload: bytes, sha256: str) -> CatalogEntry:
    """yolox-nano's entry, downloading `payload` from the local server instead."""
    root, base = http_root
    (root / "yolox_nano.onnx").write_bytes(payload)
    return dataclasses.replace(CATALOG["yolox-nano"], url=f"{base}/yolox_nano.onnx",
                               sha256=sha256, size_bytes=len(payload))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_entry_writes_a_valid_model_toml(tmp_path: Path, name: str) -> None:
    e = CATALOG[name]
    (tmp_path / name).mkdir()
    (tmp_path / name / "model.toml").write_text(e.model_toml)
    cfg = load_config(tmp_path / name)
    assert (cfg.name, cfg.task, cfg.file, cfg.weights_kind) == (name, e.task, e.file,
                                                                 "pretrained")
    assert cfg.labels == "labels.txt"


def test_catalog_labels_match_the_mirror_label_files(mirror: Path) -> None:
    for name, label_file in MIRROR_LABELS.items():
        assert CATALOG[name].label_names() == (mirror / name / label_file).read_text(
        ).splitlines(), name
    assert [len(CATALOG[n].label_names()) for n in MIRROR_LABELS] == [80, 21, 400]


def test_install_from_mirror(tmp_path: Path, mirror: Path,
                             caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "repo"
    with caplog.at_level(logging.INFO, logger="cvserve.catalog"):
        folder = install("yolox-nano", repo, mirror=mirror)
    assert folder == repo / "yolox-nano"
    cfg = load_config(folder)
    assert cfg.output.decoder == "yolox" and cfg.input.size == (416, 416)
    assert cfg.input.color == "BGR" and cfg.batching.max_batch_size == 8
    assert sha256(cfg.artifact()) == CATALOG["yolox-nano"].sha256
    labels = cfg.label_names()
    assert len(labels) == 80 and labels[0] == "person"
    assert ModelRepository(repo).names() == ["yolox-nano"]
    assert sorted(p.name for p in repo.iterdir()) == ["yolox-nano"]  # no temp folder left
    assert str(mirror / "yolox-nano" / "yolox_nano.onnx") in caplog.text
    assert available("yolox-nano", repo, None) == "installed"


@pytest.mark.parametrize("name", ["deeplabv3-mobilenetv2-voc", "i3d-kinetics400"])
def test_mirror_holds_the_other_catalog_models(tmp_path: Path, mirror: Path, name: str) -> None:
    assert available(name, tmp_path, mirror) == "mirror"
    cfg = load_config(install(name, tmp_path, mirror=mirror, download=False))
    assert sha256(cfg.artifact()) == CATALOG[name].sha256
    assert len(cfg.label_names()) == {"deeplabv3-mobilenetv2-voc": 21,
                                      "i3d-kinetics400": 400}[name]


def test_reinstall_is_a_no_op_unless_forced(tmp_path: Path, mirror: Path) -> None:
    folder = install("yolox-nano", tmp_path, mirror=mirror)
    artifact = folder / "yolox_nano.onnx"
    before = artifact.stat().st_ino
    assert install("yolox-nano", tmp_path, mirror=mirror) == folder
    assert artifact.stat().st_ino == before
    install("yolox-nano", tmp_path, mirror=mirror, force=True)
    assert artifact.stat().st_ino != before
    assert sha256(artifact) == CATALOG["yolox-nano"].sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yolox-nano"]


def test_existing_foreign_folder_is_kept_unless_forced(tmp_path: Path, mirror: Path) -> None:
    mine = tmp_path / "yolox-nano"
    mine.mkdir()
    (mine / "model.toml").write_text('task = "detection"\nbackend = "onnx"\n'
                                     'file = "yolox_nano.onnx"\n')
    (mine / "yolox_nano.onnx").write_bytes(b"my own model")
    with pytest.raises(CatalogError, match="force"):
        install("yolox-nano", tmp_path, mirror=mirror)
    assert (mine / "yolox_nano.onnx").read_bytes() == b"my own model"
    install("yolox-nano", tmp_path, mirror=mirror, force=True)
    assert sha256(mine / "yolox_nano.onnx") == CATALOG["yolox-nano"].sha256


def test_corrupted_mirror_copy_installs_nothing(tmp_path: Path) -> None:
    bad_mirror = tmp_path / "mirror"
    (bad_mirror / "yolox-nano").mkdir(parents=True)
    (bad_mirror / "yolox-nano" / "yolox_nano.onnx").write_bytes(b"not the model")
    repo = tmp_path / "repo"
    with pytest.raises(CatalogError, match="sha256"):
        install("yolox-nano", repo, mirror=bad_mirror)
    assert list(repo.iterdir()) == []
    assert available("yolox-nano", repo, bad_mirror) is None  # wrong size: not vouched for


def test_unknown_name_lists_the_catalog(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no model 'yolo9000'") as info:
        install("yolo9000", tmp_path)
    assert all(name in str(info.value) for name in CATALOG)


@pytest.mark.parametrize("has_mirror", [False, True])
def test_model_without_download_asks_for_the_mirror(tmp_path: Path, has_mirror: bool) -> None:
    empty_mirror = tmp_path / "mirror" if has_mirror else None
    repo = tmp_path / "repo"
    with pytest.raises(CatalogError, match="no direct download") as info:
        install("i3d-kinetics400", repo, mirror=empty_mirror)
    assert "model_mirror" in str(info.value) and "CVSERVE_MODEL_MIRROR" in str(info.value)
    assert not repo.exists() or list(repo.iterdir()) == []


def test_download_is_sha_checked_and_installed(tmp_path: Path,
                                               http_root: tuple[Path, str]) -> None:
    payload = b"pretend onnx bytes" * 1000
    e = served_entry(http_root, payload, hashlib.sha256(payload).hexdigest())
    repo = tmp_path / "repo"
    folder = install_entry(e, repo, None, force=False, download=True)
    assert (folder / "yolox_nano.onnx").read_bytes() == payload
    assert load_config(folder).label_names()[0] == "person"
    assert e.url in (folder / "NOTICE.txt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["yolox-nano"]


def test_download_with_wrong_sha_installs_nothing(tmp_path: Path,
                                                  http_root: tuple[Path, str]) -> None:
    e = served_entry(http_root, b"tampered bytes", "0" * 64)
    repo = tmp_path / "repo"
    with pytest.raises(CatalogError, match="sha256"):
        install_entry(e, repo, None, force=False, download=True)
    assert list(repo.iterdir()) == []


def test_failed_or_disallowed_download_names_the_mirror_setting(
        tmp_path: Path, http_root: tuple[Path, str]) -> None:
    e = dataclasses.replace(CATALOG["yolox-nano"], url=f"{http_root[1]}/missing.onnx")
    repo = tmp_path / "repo"
    with pytest.raises(CatalogError, match="404.*CVSERVE_MODEL_MIRROR"):
        install_entry(e, repo, None, force=False, download=True)
    with pytest.raises(CatalogError, match="downloads are off.*CVSERVE_MODEL_MIRROR"):
        install_entry(e, repo, None, force=False, download=False)
    assert list(repo.iterdir()) == []
