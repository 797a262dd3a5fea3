"""The model repository: model.toml is validated, and errors name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvserve.app.errors import ModelNotFound
from cvserve.worker.repository import ModelRepository, load_config


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(text)
    return folder


def test_minimal_toml_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "m", 'task = "detection"\nbackend = "onnx"\n'
                                            'file = "model.onnx"\n'))
    assert cfg.name == "m" and cfg.batching.max_batch_size == 1
    assert cfg.thresholds.score_threshold == 0.5
    assert cfg.artifact() == tmp_path / "m" / "model.onnx"


@pytest.mark.parametrize("text,field", [
    ('task = "dancing"\nbackend = "onnx"\nfile = "m.onnx"\n', "task"),
    ('task = "detection"\nbackend = "tensorflow"\nfile = "m.onnx"\n', "backend"),
    ('task = "detection"\nbackend = "onnx"\nfile = "m{batch}.onnx"\n'
     '[batching]\nmax_batch_size = 8\nbatch_sizes = [1, 2, 4]\n', "max_batch_size"),
    ('task = "detection"\nbackend = "onnx"\n', "file"),
    ('task = "detection\n', "model.toml"),
])
def test_bad_toml_names_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    folder = write(tmp_path / "bad", text)
    with pytest.raises(ValueError, match="model.toml") as info:
        load_config(folder)
    assert field in str(info.value)


def test_repository_skips_broken_and_unbuilt_models(tmp_path: Path) -> None:
    write(tmp_path / "broken", "task = ")
    write(tmp_path / "unbuilt", 'task = "detection"\nbackend = "onnx"\nfile = "model.onnx"\n')
    ok = write(tmp_path / "ok", 'task = "detection"\nbackend = "onnx"\nfile = "model.onnx"\n')
    (ok / "model.onnx").write_bytes(b"")
    repo = ModelRepository(tmp_path)
    assert repo.names() == ["broken", "ok", "unbuilt"]
    assert [c.name for c in repo.configs()] == ["ok"]
    with pytest.raises(ModelNotFound, match="have: broken, ok, unbuilt"):
        repo.get("missing")


def test_workers_sharing_a_repository_build_the_defaults_in_turn(random_repo: Path,
                                                                 tmp_path: Path) -> None:
    """docker-compose's workers share one models volume: while one builds the default
    models, another waits for it and then serves what it built instead of building the
    same files over it."""
    import fcntl
    import shutil
    import threading

    from cvserve.app.settings import Settings
    from cvserve.worker.server import serving_configs

    repo = tmp_path / "models"
    repo.mkdir()
    found: list[list[str]] = []
    with open(repo / ".build.lock", "w") as lock:  # another worker is building
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: found.append(
            [c.name for c in serving_configs(Settings(model_repository=repo))]))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive(), "a second worker built while the first held the lock"
        shutil.copytree(random_repo / "frcnn-ts", repo / "frcnn-ts")  # what it built
    waiting.join(60)
    assert found == [["frcnn-ts"]]
