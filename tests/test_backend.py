"""Backends: ONNX provider choice, and fixed-batch artifacts serving any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cvserve.app.settings import Settings
from cvserve.worker.backend import load_backend
from cvserve.worker.onnx_backend import select_providers
from cvserve.worker.repository import load_config


def test_gpu_providers_are_preferred_when_present() -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(available, "auto") == available
    assert select_providers(available, "cuda") == available
    assert select_providers(available, "cpu") == ["CPUExecutionProvider"]


def test_cpu_build_falls_back_to_cpu_unless_cuda_is_demanded() -> None:
    assert select_providers(["CPUExecutionProvider"], "auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        select_providers(["CPUExecutionProvider"], "cuda")


class Affine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


def fixed_batch_model(tmp_path: Path, sizes: list[int]) -> Path:
    """A model folder with one ONNX graph per fixed batch size (like exported detectors)."""
    folder = tmp_path / "affine"
    folder.mkdir()
    for b in sizes:
        torch.onnx.export(Affine(), (torch.zeros(b, 3),), str(folder / f"model.b{b}.onnx"),
                          dynamo=False, input_names=["x"], output_names=["y"])
    (folder / "model.toml").write_text(
        'task = "detection"\nbackend = "onnx"\nfile = "model.b{batch}.onnx"\n'
        'labels = ""\ninputs = ["x"]\noutputs = ["y"]\n'
        f"[batching]\nmax_batch_size = {sizes[-1]}\nbatch_sizes = {sizes}\n")
    return folder


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_fixed_batch_graphs_serve_any_batch_size(tmp_path: Path, n: int) -> None:
    cfg = load_config(fixed_batch_model(tmp_path, [1, 2, 4]))
    backend = load_backend(cfg, Settings(device="cpu"))
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = backend.run({"x": x})["y"]
    assert y.shape == (n, 3)
    np.testing.assert_allclose(y, x * 2 + 1)


class Flatten(torch.nn.Module):
    """Traced at batch 1, its Reshape hard-codes the batch: [1, -1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).reshape(1, -1)


class MixesBatch(torch.nn.Module):
    """Fine at batch 1; with a symbolic batch each item would see the others."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True) + x.sum()


def single_graph_model(tmp_path: Path, module: torch.nn.Module, symbolic: bool = True) -> Path:
    folder = tmp_path / type(module).__name__
    folder.mkdir()
    torch.onnx.export(module, (torch.zeros(1, 3, 4),), str(folder / "model.onnx"),
                      dynamo=False, input_names=["x"], output_names=["y"])
    (folder / "model.toml").write_text(
        'task = "detection"\nbackend = "onnx"\nfile = "model.onnx"\nlabels = ""\n'
        'inputs = ["x"]\noutputs = ["y"]\n'
        f"[batching]\nmax_batch_size = 4\nsymbolic_batch = {str(symbolic).lower()}\n")
    return folder


def one_at_a_time(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x[i:i + 1])).numpy()
                               for i in range(len(x))])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_batch_fixed_at_one_is_made_symbolic_when_outputs_match(tmp_path: Path) -> None:
    backend = load_backend(load_config(single_graph_model(tmp_path, Flatten())),
                           Settings(device="cpu"))
    assert backend.batch_mode == "dynamic (made symbolic, verified)"
    assert backend.batch_sizes is None and backend.batch_limit is None
    x = np.random.default_rng(0).normal(size=(3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(backend.run({"x": x})["y"], one_at_a_time(Flatten(), x),
                               rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("symbolic", [True, False])
def test_batch_fixed_at_one_that_cannot_batch_runs_one_at_a_time(tmp_path: Path,
                                                                 symbolic: bool) -> None:
    backend = load_backend(load_config(single_graph_model(tmp_path, MixesBatch(), symbolic)),
                           Settings(device="cpu"))
    assert backend.batch_mode == "fixed 1" and backend.batch_limit == 1
    x = np.random.default_rng(1).normal(size=(3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(backend.run({"x": x})["y"], one_at_a_time(MixesBatch(), x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_solo_runs_use_the_kept_multithreaded_sessions(tmp_path: Path) -> None:
    backend = load_backend(load_config(single_graph_model(tmp_path, Flatten())),
                           Settings(device="cpu", intra_op_threads=0))
    many = backend.threads
    backend.set_threads(1, keep=True)
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    plain = backend.run({"x": x})["y"]
    used = {}
    real_run = backend._run

    def spy(inputs: dict) -> dict:
        sessions = getattr(backend._local, "sessions", None) or backend.sessions
        used["threads"] = sessions[0].get_session_options().intra_op_num_threads
        return real_run(inputs)

    backend._run = spy  # type: ignore[method-assign]
    backend.run({"x": x})
    assert used["threads"] == 1
    with backend.solo_threads():
        solo = backend.run({"x": x})["y"]
    assert used["threads"] == many
    np.testing.assert_allclose(solo, plain, rtol=1e-6)
