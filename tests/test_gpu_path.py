"""The GPU path (worker/gpu.py, worker/torchscript_backend.py), behind one switch: `device`.

The CPU tests run everywhere: with device=cpu nothing of CUDA is created and results equal
the plain module's, fp16 is refused with a log, and JPEG routing sends every upload that
nvjpeg would decode differently from Pillow to Pillow. The CUDA tests run where torch sees
a GPU (bench/gpu_check.sh runs this file there).

Detections are compared on the demo detector (trained): random weights give every
detection nearly the same score (~1/91, within 4e-5), so which boxes make the top 100
is float noise on any two devices; for them only the sorted scores are compared.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from cvserve.app.errors import PayloadTooLarge
from cvserve.app.queue import Job
from cvserve.app.settings import Settings
from cvserve.models.export import check_images, decisive, export_detector
from cvserve.models.synthetic import make_scene
from cvserve.worker import gpu
from cvserve.worker.backend import Arrays
from cvserve.worker.imaging import decode_rgb
from cvserve.worker.repository import ModelConfig, load_config
from cvserve.worker.server import build_task
from cvserve.worker.torchscript_backend import TorchScriptBackend, half_precision

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/gpu_check.sh runs these there)")
ON_DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def with_fields(model: Any, **fields: Any) -> Any:
    """A copy of a settings object or model config with fields set, whether or not its
    class declares them yet (fp16, gpu_jpeg_decode, allow_fp16 are read with getattr)."""
    return model.model_copy(update=fields)


@pytest.fixture(scope="module")
def demo_dir(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo detector (trained, ~1M parameters) as TorchScript."""
    return export_detector("tiny_fasterrcnn", tmp_path_factory.mktemp("gpu-demo"),
                           weights=str(demo_checkpoint), fmt="torchscript", name="demo-ts",
                           check=False)


@pytest.fixture(scope="module")
def demo_cfg(demo_dir: Path) -> ModelConfig:
    return load_config(demo_dir)


@pytest.fixture(scope="module")
def core_inputs(demo_cfg: ModelConfig) -> list[Arrays]:
    """The core's inputs for generated JPEGs: each image alone, then all four padded into
    one batch. Preprocessed once, on the CPU, so every device sees the same numbers."""
    task = build_task(demo_cfg, Settings(device="cpu"))
    items = [task.prepare(Job(model="m", task="detection", payload=data, deadline_ms=0))
             for data in check_images(4)]

    def arrays(group: list) -> Arrays:
        images = task.transform.batch_images([p.inputs for p in group])
        sizes = np.array([p.meta["resized_size"] for p in group], dtype=np.int64)
        return {"images": images.numpy(), "image_sizes": sizes}

    return [*(arrays([p]) for p in items), arrays(items)]


@pytest.fixture
def no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN convolutions in full fp32: PyTorch's default TF32 (10-bit mantissa) moves a
    trained detector's scores by ~1e-3, which would hide a real difference from the CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


Detections = list[dict[str, torch.Tensor]]  # per image: boxes [N, 4], scores [N], labels [N]


def detections(out: Arrays) -> Detections:
    """The core's padded outputs -> each image's valid rows."""
    return [{"boxes": torch.from_numpy(out["boxes"][i, :n]),
             "scores": torch.from_numpy(out["scores"][i, :n]),
             "labels": torch.from_numpy(out["labels"][i, :n])}
            for i, n in enumerate(out["counts"].tolist())]


def assert_same_detections(ref: Detections, got: Detections, box_px: float, score_tol: float,
                           min_score: float = 0.0, min_iou: float | None = None) -> None:
    """Every decisive detection of `ref` (see export.decisive) scoring at least min_score
    is in `got`: same label, each corner within box_px (or, with min_iou, an IoU of at
    least that), score within score_tol."""
    checked, missing = 0, []
    for k, (r, g) in enumerate(zip(ref, got, strict=True)):
        for i in decisive(r, score_tol):
            if float(r["scores"][i]) < min_score:
                continue
            checked += 1
            if min_iou is None:
                same_box = (g["boxes"] - r["boxes"][i]).abs().amax(dim=1) <= box_px
            else:
                same_box = box_iou(r["boxes"][i][None], g["boxes"])[0] >= min_iou
            close = ((g["labels"] == r["labels"][i]) & same_box
                     & ((g["scores"] - r["scores"][i]).abs() <= score_tol))
            if not close.any():
                missing.append((k, r["labels"][i].item(), r["scores"][i].item(),
                                r["boxes"][i].tolist(), nearest(g, r["boxes"][i])))
    assert checked > 0, "no decisive detection to compare: the test compares nothing"
    assert not missing, (f"{len(missing)} of {checked} detections not reproduced (image, "
                         f"label, score, box, nearest in got): {missing[:5]}")


def nearest(got: dict[str, torch.Tensor], box: torch.Tensor) -> tuple | None:
    """The detection of `got` overlapping `box` most: (IoU, label, score, box), for messages."""
    if len(got["boxes"]) == 0:
        return None
    iou = box_iou(box[None], got["boxes"])[0]
    j = int(iou.argmax())
    return (round(float(iou[j]), 3), int(got["labels"][j]), round(float(got["scores"][j]), 4),
            [round(v, 1) for v in got["boxes"][j].tolist()])


def assert_outputs_equal(a: Arrays, b: Arrays, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


# --- the switch on the CPU ---------------------------------------------------------------
def test_cpu_path_creates_no_cuda_objects(monkeypatch: pytest.MonkeyPatch,
                                          demo_cfg: ModelConfig,
                                          core_inputs: list[Arrays]) -> None:
    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CPU path touched CUDA")

    for name in ("Stream", "Event", "stream", "current_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_cuda)
    monkeypatch.setattr(torch.Tensor, "record_stream", no_cuda)
    backend = TorchScriptBackend(demo_cfg, Settings(device="cpu"))
    assert backend.compute_stream is None
    staged = backend.stage(core_inputs[0])
    assert staged.ready is None and not any(t.is_cuda for t in staged.tensors.values())
    backend.run_staged(staged)
    backend.run(core_inputs[-1])
    # The task on top, decode to reply, takes the CPU path too.
    task = build_task(demo_cfg, Settings(device="cpu"))
    item = task.prepare(Job(model="m", task="detection", payload=check_images(1)[0],
                            deadline_ms=0))
    task.finish(item, task.run([item])[0])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_cpu_backend_equals_the_plain_module(demo_cfg: ModelConfig,
                                             core_inputs: list[Arrays]) -> None:
    backend = TorchScriptBackend(demo_cfg, Settings(device="cpu"))
    plain = torch.jit.load(str(demo_cfg.artifact())).eval()
    for inputs in core_inputs:
        with torch.inference_mode():
            out = plain(*(torch.from_numpy(inputs[n]) for n in demo_cfg.inputs))
        expected = {n: t.numpy() for n, t in zip(demo_cfg.outputs, out, strict=True)}
        assert_outputs_equal(backend.run(inputs), expected)


@pytest.mark.parametrize("device", ON_DEVICES)
def test_staged_on_another_thread_equals_run(device: str, demo_cfg: ModelConfig,
                                             core_inputs: list[Arrays]) -> None:
    """As the worker does it: staged on a decode thread, run on the model thread."""
    backend = TorchScriptBackend(demo_cfg, Settings(device=device))
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        for inputs in core_inputs:
            expected = backend.run(inputs)
            staged = pool.submit(backend.stage, inputs).result()
            assert_outputs_equal(backend.run_staged(staged), expected, atol=1e-4)


def test_fp16_is_refused_on_the_cpu_with_a_log(demo_cfg: ModelConfig,
                                               core_inputs: list[Arrays],
                                               caplog: pytest.LogCaptureFixture) -> None:
    settings = with_fields(Settings(device="cpu"), fp16=True)
    with caplog.at_level("WARNING", logger="cvserve.torchscript"):
        backend = TorchScriptBackend(with_fields(demo_cfg, allow_fp16=True), settings)
    assert not backend.fp16
    assert backend.describe()["precision"] == "float32"
    assert "CVSERVE_FP16 applies on a GPU only" in caplog.text
    assert backend.run(core_inputs[0])["scores"].dtype == np.float32


def test_fp16_needs_the_switch_and_the_models_permission(demo_cfg: ModelConfig) -> None:
    on = with_fields(Settings(device="cuda"), fp16=True)
    allowed = with_fields(demo_cfg, allow_fp16=True)
    assert half_precision(allowed, Settings(device="cuda"), "cuda")[0] is False
    refused, why = half_precision(with_fields(demo_cfg, allow_fp16=False), on, "cuda")
    assert refused is False and "allow_fp16 = true" in why
    assert half_precision(allowed, on, "cuda")[0] is True
    assert half_precision(allowed, on, "cpu")[0] is False


# --- JPEG decoding: which uploads nvjpeg may decode ---------------------------------------
def encoded(mode: str = "RGB", fmt: str = "JPEG", orientation: int | None = None,
            size: tuple[int, int] = (64, 48)) -> bytes:
    """A generated scene (width x height) saved as `fmt` in `mode`, with an EXIF
    orientation tag when given."""
    image = make_scene(7, *size).image.convert(mode)
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[gpu.EXIF_ORIENTATION] = orientation
        kwargs["exif"] = exif
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


PILLOW_ROUTE = {
    "cmyk": (lambda: encoded("CMYK"), "JPEG in mode CMYK"),
    "grayscale": (lambda: encoded("L"), "JPEG in mode L"),
    "exif-rotated": (lambda: encoded(orientation=6), "EXIF orientation 6"),
    "png": (lambda: encoded(fmt="PNG"), "not a JPEG (PNG)"),
}


@pytest.mark.parametrize("make", [lambda: encoded(), lambda: encoded(orientation=1)],
                         ids=["plain", "exif-upright"])
def test_plain_rgb_jpegs_go_to_nvjpeg(make: Callable[[], bytes]) -> None:
    assert gpu.nvjpeg_refusal(make()) is None


@pytest.mark.parametrize("case", PILLOW_ROUTE)
def test_other_uploads_go_to_pillow(case: str) -> None:
    make, reason = PILLOW_ROUTE[case]
    assert gpu.nvjpeg_refusal(make()) == reason


@pytest.fixture
def nvjpeg_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records each call of the GPU decoder (which still decodes)."""
    calls: list[bytes] = []
    real = gpu._nvjpeg

    def spy(data: bytes, device: str | torch.device) -> torch.Tensor:
        calls.append(data)
        return real(data, device)

    monkeypatch.setattr(gpu, "_nvjpeg", spy)
    return calls


@pytest.mark.parametrize("case", PILLOW_ROUTE)
def test_pillow_route_decodes_as_the_cpu_path(case: str, nvjpeg_calls: list[bytes]) -> None:
    data = PILLOW_ROUTE[case][0]()
    image = gpu.decode_jpeg_gpu(data, device="cpu")
    assert not nvjpeg_calls
    assert torch.equal(image, decode_rgb(data, 10**8)[0])
    if case == "exif-rotated":  # stored 64x48, upright 48x64
        assert image.shape == (3, 64, 48)


def test_jpeg_route_decodes_close_to_pillow_on_the_cpu(nvjpeg_calls: list[bytes]) -> None:
    """On a CPU device the decoder route runs torchvision's CPU decoder, which also checks
    that its deprecation warning stays silenced (pytest turns warnings into errors)."""
    data = encoded(size=(320, 240))
    image = gpu.decode_jpeg_gpu(data, device="cpu")
    assert len(nvjpeg_calls) == 1
    reference = decode_rgb(data, 10**8)[0]
    assert image.shape == reference.shape
    assert (image.float() - reference.float()).abs().mean() < 2


def test_decoder_errors_fall_back_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes, device: str | torch.device) -> torch.Tensor:
        raise RuntimeError("nvjpeg: unsupported bitstream")

    monkeypatch.setattr(gpu, "_nvjpeg", broken)
    data = encoded()
    assert torch.equal(gpu.decode_jpeg_gpu(data, device="cpu"), decode_rgb(data, 10**8)[0])


def test_pixel_limit_applies_before_the_gpu_decoder(nvjpeg_calls: list[bytes]) -> None:
    with pytest.raises(PayloadTooLarge):
        gpu.decode_jpeg_gpu(encoded(size=(320, 240)), device="cpu", max_pixels=320 * 239)
    assert not nvjpeg_calls


# --- on a GPU ----------------------------------------------------------------------------
@needs_cuda
def test_cuda_fp32_equals_cpu(demo_cfg: ModelConfig, core_inputs: list[Arrays],
                              no_tf32: None) -> None:
    cpu = TorchScriptBackend(demo_cfg, Settings(device="cpu"))
    cuda = TorchScriptBackend(demo_cfg, Settings(device="cuda"))
    assert cuda.compute_stream is not None
    for inputs in core_inputs:
        assert_same_detections(detections(cpu.run(inputs)), detections(cuda.run(inputs)),
                               box_px=0.5, score_tol=1e-3)


@needs_cuda
def test_cuda_fp32_equals_cpu_with_random_weights(random_repo: Path,
                                                  core_inputs: list[Arrays],
                                                  no_tf32: None) -> None:
    """torchvision's default detector, random weights: the sorted scores agree (which of
    the near-tied boxes make the top 100 is float noise, see the module docstring)."""
    cfg = load_config(random_repo / "frcnn-ts")
    cpu = TorchScriptBackend(cfg, Settings(device="cpu"))
    cuda = TorchScriptBackend(cfg, Settings(device="cuda"))
    for inputs in core_inputs:
        a, b = cpu.run(inputs), cuda.run(inputs)
        np.testing.assert_array_equal(a["counts"], b["counts"])
        np.testing.assert_allclose(np.sort(a["scores"], axis=1), np.sort(b["scores"], axis=1),
                                   rtol=0, atol=1e-3)


@needs_cuda
def test_cuda_fp16_is_close_to_fp32(demo_cfg: ModelConfig, core_inputs: list[Arrays],
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Tolerances: scores go through ~20 layers at ~5e-4 relative error each: 0.02. Boxes:
    fp16 moves the RPN's objectness enough to change which proposals survive its top-k and
    NMS, and the box head then refines a neighbouring proposal, so a corner can move a few
    pixels (on an H200: 3.4 px on a 92-px-tall box, IoU 0.934, same label, score 0.5373 vs
    0.5371): boxes must overlap with IoU >= 0.9. Only detections scoring >= 0.3 are
    compared: below that, near-tied labels of one object swap under the same proposal
    change (seen: a 0.10 triangle whose fp16 counterpart is a 0.67 star at IoU 0.61)."""
    with caplog.at_level("INFO", logger="cvserve.torchscript"):
        half = TorchScriptBackend(with_fields(demo_cfg, allow_fp16=True),
                                  with_fields(Settings(device="cuda"), fp16=True))
    assert half.fp16 and half.describe()["precision"] == "float16"
    assert "float16" in caplog.text
    full = TorchScriptBackend(demo_cfg, Settings(device="cuda"))
    for inputs in core_inputs:
        got = half.run(inputs)
        assert got["boxes"].dtype == got["scores"].dtype == np.float32
        assert_same_detections(detections(full.run(inputs)), detections(got), box_px=0.0,
                               score_tol=0.02, min_score=0.3, min_iou=0.9)


@needs_cuda
def test_cuda_fp16_runs_torchvisions_default_detector(random_repo: Path,
                                                      core_inputs: list[Arrays]) -> None:
    cfg = with_fields(load_config(random_repo / "frcnn-ts"), allow_fp16=True)
    half = TorchScriptBackend(cfg, with_fields(Settings(device="cuda"), fp16=True))
    full = TorchScriptBackend(cfg, Settings(device="cuda"))
    a, b = full.run(core_inputs[-1]), half.run(core_inputs[-1])
    np.testing.assert_allclose(np.sort(a["scores"], axis=1), np.sort(b["scores"], axis=1),
                               rtol=0, atol=0.02)


@needs_cuda
def test_staging_does_not_wait_for_compute(demo_cfg: ModelConfig,
                                           core_inputs: list[Arrays]) -> None:
    """The point of the copy stream: a batch staged while the model computes is on the GPU
    before that compute ends."""
    backend = TorchScriptBackend(demo_cfg, Settings(device="cuda"))
    inputs = core_inputs[-1]
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        # Warm up this thread's stream and the pinned blocks for these shapes.
        pool.submit(lambda: backend.stage(inputs).ready.synchronize()).result()
        with backend.compute():
            torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU clock: a long batch
        staged = pool.submit(backend.stage, inputs).result()
        assert staged.ready is not None
        staged.ready.synchronize()
        compute_busy = not backend.compute_stream.query()
    backend.compute_stream.synchronize()
    assert compute_busy, "the staged copy waited for the compute stream"


@needs_cuda
def test_gpu_jpeg_decode_is_close_to_pillow(nvjpeg_calls: list[bytes]) -> None:
    """nvjpeg and libjpeg-turbo differ in IDCT and chroma upsampling: a mean difference
    under 2 grey levels is torchvision's own tolerance for the two."""
    data = make_scene(3, 640, 480).jpeg()
    image = gpu.decode_jpeg_gpu(data)
    assert image.is_cuda and len(nvjpeg_calls) == 1
    reference = decode_rgb(data, 10**8)[0]
    assert image.shape == reference.shape and image.dtype == torch.uint8
    assert (image.cpu().float() - reference.float()).abs().mean() < 2


@needs_cuda
@pytest.mark.parametrize("case", PILLOW_ROUTE)
def test_pillow_route_on_the_gpu_is_exact(case: str, nvjpeg_calls: list[bytes]) -> None:
    data = PILLOW_ROUTE[case][0]()
    image = gpu.decode_jpeg_gpu(data)
    assert image.is_cuda and not nvjpeg_calls
    assert torch.equal(image.cpu(), decode_rgb(data, 10**8)[0])


@needs_cuda
def test_detection_task_on_cuda_equals_cpu(demo_cfg: ModelConfig, no_tf32: None) -> None:
    """The whole task (decode, preprocess, batch, run) on the GPU against the CPU, Pillow
    decoding both: preprocessing on the device changes nothing but float rounding."""
    settings = with_fields(Settings(device="cuda"), gpu_jpeg_decode=False)
    tasks = {"cpu": build_task(demo_cfg, Settings(device="cpu")),
             "cuda": build_task(demo_cfg, settings)}
    found: dict[str, Detections] = {}
    for device, task in tasks.items():
        items = [task.prepare(Job(model="m", task="detection", payload=data, deadline_ms=0))
                 for data in check_images(4)]
        found[device] = [{k: torch.from_numpy(v) for k, v in task.run([item])[0].items()}
                         for item in items]
    assert_same_detections(found["cpu"], found["cuda"], box_px=0.5, score_tol=1e-3)


@needs_cuda
def test_explainer_on_cuda_equals_cpu(no_tf32: None) -> None:
    """/explain's gradient methods on the GPU (the eager module on the worker's device)
    give the CPU's maps and targets, batched."""
    import torchvision

    from cvserve.models.export import scene_batch
    from cvserve.worker.explain_methods import Explainer

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = scene_batch(3, n=2, size=128)
    maps = {}
    for device in ("cpu", "cuda"):
        explainer = Explainer(net, device, head="fc", layer="layer4")
        for method in ("gradcam", "gradcam++", "saliency", "guided-backprop",
                       "guided-gradcam"):
            m, logits, chosen = explainer.run(method, x, [3, None], "layer4")
            maps[device, method] = (m.cpu(), chosen.cpu())
        net = net.cpu()  # Explainer moved it; the next device starts from the CPU
    for method in ("gradcam", "gradcam++", "saliency", "guided-backprop", "guided-gradcam"):
        (a, ta), (b, tb) = maps["cpu", method], maps["cuda", method]
        assert torch.equal(ta, tb), method
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0, msg=method)
