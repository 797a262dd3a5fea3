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
