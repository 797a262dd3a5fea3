"""The Open Inference Protocol (KServe v2) with Triton's own clients, unmodified:
tritonclient.http (REST, JSON and binary tensors) and tritonclient.grpc, against a live
cvserve embedded and with api and worker apart over Redis."""

from __future__ import annotations

import base64
import io
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from cvserve.models.classifiers import export_resnet
from cvserve.models.segment_export import export_segmenter
from cvserve.models.synthetic import make_scene
from cvserve.models.synthetic_video import make_action_video
from cvserve.models.train_video import export_demo_actions

from .conftest import Service, batch_counts, free_port, pin_batching

grpcclient = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient[grpc]")
httpclient = pytest.importorskip("tritonclient.http", reason="pip install tritonclient[http]")
from tritonclient.utils import InferenceServerException  # noqa: E402

DETECTOR, ONNX, TS = "demo-ts", "resnet18-onnx", "resnet18-ts"
SEGMENTER, VIDEO = "lraspp_mobilenet_v3_large", "demo-actions"
UPLOAD_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def v2_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo-v2")
    shutil.copytree(demo_repo / DETECTOR, repo / DETECTOR)
    export_resnet("resnet18", repo, weights="random", fmt="onnx", name=ONNX, check=False)
    export_resnet("resnet18", repo, weights="random", fmt="torchscript", name=TS, check=False)
    export_segmenter(SEGMENTER, repo, weights="random", check=False)
    export_demo_actions(repo)
    for name in (ONNX, TS, SEGMENTER, VIDEO):
        pin_batching(repo / name)
    return repo


@dataclass
class Deployment:
    http_url: str  # also the api's /detect
    grpc_url: str
    metrics_url: str  # where the worker's metrics are served (batch_counts adds /metrics)
    repo: Path


@pytest.fixture(scope="module", params=["embedded", "redis"])
def deployment(request: pytest.FixtureRequest, v2_repo: Path, redis_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("v2-logs")
    grpc_port, port = free_port(), free_port()
    env = {"CVSERVE_MODEL_REPOSITORY": str(v2_repo), "CVSERVE_GRPC_PORT": str(grpc_port),
           "CVSERVE_UPLOAD_BYTES": str(UPLOAD_BYTES), "CVSERVE_AUTO_BUILD_DEFAULT": "false"}
    started: list[Service] = []
    try:
        if request.param == "embedded":
            api = Service("run", env, logs, port=port).start()
            started.append(api)
            metrics = api.url
        else:
            metrics_port = free_port()
            env |= {"CVSERVE_REDIS_URL": redis_url,
                    "CVSERVE_KEY_PREFIX": f"cvserve-v2-{port}"}
            started.append(Service("worker", {**env, "CVSERVE_WORKER_METRICS_PORT":
                                              str(metrics_port)}, logs).start())
            api = Service("api", env, logs, port=port).start()
            started.append(api)
            metrics = f"http://127.0.0.1:{metrics_port}"
        api.wait_ready(180)
        yield Deployment(api.url, f"127.0.0.1:{grpc_port}", metrics, v2_repo)
    finally:
        for svc in reversed(started):
            svc.stop()


def clients(d: Deployment) -> list:
    return [httpclient.InferenceServerClient(d.http_url.removeprefix("http://")),
            grpcclient.InferenceServerClient(d.grpc_url)]


def infer_input(module, name: str, array: np.ndarray, binary: bool = True):
    tensor = module.InferInput(name, list(array.shape),
                               {np.float32: "FP32", np.float64: "FP64", np.object_: "BYTES"}[
                                   array.dtype.type])
    if module is httpclient:
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(deployment: Deployment) -> None:
    for client in clients(deployment):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(ONNX) and client.is_model_ready(TS, "1")
        assert not client.is_model_ready("no-such-model")
        server = client.get_server_metadata()
        server = server if isinstance(server, dict) else {"name": server.name}
        assert server["name"] == "cvserve"
    meta = clients(deployment)[0].get_model_metadata(ONNX)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "features"]
    ts = clients(deployment)[1].get_model_metadata(TS)
    assert ts.platform == "pytorch_libtorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in ts.inputs] == [
        ("images", "FP32", [-1, 3, -1, -1])]
    assert [(t.name, list(t.shape)) for t in ts.outputs] == [("logits", [-1, 1000]),
                                                              ("features", [-1, 512, -1, -1])]


def reference(d: Deployment, name: str, images: np.ndarray) -> np.ndarray:
    """The artifact run directly on the same tensor: logits."""
    folder = d.repo / name
    if name == ONNX:
        return ort.InferenceSession(str(folder / "model.onnx")).run(["logits"],
                                                                    {"images": images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's upstream deprecation
        module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(images))[0].numpy()


@pytest.mark.parametrize("name", [ONNX, TS])
def test_raw_tensors_equal_the_backend_run_directly(deployment: Deployment, name: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = reference(deployment, name, images)
    for module, client in zip((httpclient, grpcclient), clients(deployment), strict=True):
        binaries = (True, False) if module is httpclient else (True,)
        for binary in binaries:  # REST: binary tensors and JSON data
            outputs = [module.InferRequestedOutput("logits", **(
                {"binary_data": binary} if module is httpclient else {}))]
            result = client.infer(name, [infer_input(module, "images", images, binary)],
                                  outputs=outputs)
            logits = result.as_numpy("logits")
            assert logits.shape == (2, 1000)
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
            assert result.as_numpy("features") is None  # only what was asked for


def test_bytes_jpeg_gives_the_detections_of_detect(deployment: Deployment) -> None:
    scenes = [make_scene(31).jpeg(), make_scene(32, 480, 360).jpeg()]
    direct = [httpx.post(f"{deployment.http_url}/detect", files={"file": ("s.jpg", data)},
                         timeout=60).json()["detections"] for data in scenes]
    payload = np.array(scenes, dtype=np.object_)
    for module, client in zip((httpclient, grpcclient), clients(deployment), strict=True):
        result = client.infer(DETECTOR, [infer_input(module, "image", payload)])
        count = result.as_numpy("count")
        boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
        labels = result.as_numpy("labels")
        assert count.tolist() == [len(d) for d in direct]
        for i, dets in enumerate(direct):  # the same, up to FP32 (the tensors' datatype)
            assert [labels[i, j].decode() for j in range(count[i])] == [
                d["label"] for d in dets]
            np.testing.assert_allclose(scores[i, :count[i]], [d["score"] for d in dets],
                                       atol=1e-5)
            np.testing.assert_allclose(boxes[i, :count[i]], [
                [d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in dets], atol=1e-3)


def bytes_infer(d: Deployment, model: str, items: list[bytes], **parameters: object):
    """One BYTES request per client: [(module, result)]."""
    payload = np.array(items, dtype=np.object_)
    return [(module, client.infer(model, [infer_input(module, "file", payload)],
                                  parameters=parameters or None))
            for module, client in zip((httpclient, grpcclient), clients(d), strict=True)]


def test_bytes_images_give_the_label_maps_of_segment(deployment: Deployment) -> None:
    scenes = [make_scene(41, 320, 240).jpeg(), make_scene(42, 200, 280).jpeg()]
    maps = []
    for data in scenes:
        answer = httpx.post(f"{deployment.http_url}/segment", files={"file": ("s.jpg", data)},
                            timeout=60).json()
        png = base64.b64decode(answer["label_map"]["data"])
        maps.append(np.array(Image.open(io.BytesIO(png))).astype(np.int32))
    for _, result in bytes_infer(deployment, SEGMENTER, scenes):
        label_map, size = result.as_numpy("label_map"), result.as_numpy("size")
        assert label_map.shape == (2, 280, 320)
        assert size.tolist() == [[240, 320], [280, 200]]
        for i, expected in enumerate(maps):
            h, w = expected.shape
            np.testing.assert_array_equal(label_map[i, :h, :w], expected)
            assert (label_map[i, h:, :] == -1).all() and (label_map[i, :, w:] == -1).all()


def test_bytes_videos_give_the_labels_of_classify_video(deployment: Deployment) -> None:
    video = make_action_video(43, 4.0).mp4()
    top = httpx.post(f"{deployment.http_url}/classify-video",
                     files={"file": ("v.mp4", video)}, timeout=120).json()["top"]
    for _, result in bytes_infer(deployment, VIDEO, [video]):
        labels = [v.decode() for v in result.as_numpy("labels")[0]]
        assert labels == [t["label"] for t in top]
        assert result.as_numpy("classes")[0].tolist() == [t["class_id"] for t in top]
        np.testing.assert_allclose(result.as_numpy("scores")[0], [t["score"] for t in top],
                                   atol=1e-5)


def test_bytes_images_give_the_heatmaps_of_explain(deployment: Deployment) -> None:
    image = make_scene(44).jpeg()
    answer = httpx.post(f"{deployment.http_url}/explain", params={"model": ONNX,
                                                                   "method": "cam"},
                        files={"file": ("s.jpg", image)}, timeout=60).json()
    for _, result in bytes_infer(deployment, ONNX, [image], method="cam"):
        np.testing.assert_allclose(result.as_numpy("heatmap")[0],
                                   answer["heatmap"]["data"], atol=1e-4)
        np.testing.assert_allclose(result.as_numpy("region")[0], answer["heatmap"]["region"],
                                   atol=1e-3)
        assert [v.decode() for v in result.as_numpy("labels")[0]] == [
            t["label"] for t in answer["top"]]


def test_concurrent_requests_are_batched(deployment: Deployment) -> None:
    images = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    before_runs, before_items = batch_counts(deployment.metrics_url, ONNX)

    def one(_: int) -> None:
        client = grpcclient.InferenceServerClient(deployment.grpc_url)
        client.infer(ONNX, [infer_input(grpcclient, "images", images)])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(48)))
    runs, items = batch_counts(deployment.metrics_url, ONNX)
    assert items - before_items == 48
    assert runs - before_runs < 48, "no batch held more than one request"


def status_of(call) -> tuple[int | str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


def test_bad_requests_get_protocol_errors_and_the_worker_lives(deployment: Deployment) -> None:
    http, grpc = clients(deployment)
    good = np.zeros((1, 3, 224, 224), np.float32)
    cases = {
        "datatype": (ONNX, [("images", good.astype(np.float64))], "expected datatype FP32"),
        "shape": (ONNX, [("images", np.zeros((1, 3, 100, 100), np.float32))],
                  "expected shape [-1, 3, 224, 224]"),
        "input name": (ONNX, [("pixels", good)], "takes inputs ['images']"),
        "model": ("no-such-model", [("images", good)], "unknown model 'no-such-model'"),
    }
    for case, (model, tensors, message) in cases.items():
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            status, text = status_of(lambda: client.infer(  # noqa: B023
                model, [infer_input(module, n, a) for n, a in tensors]))  # noqa: B023
            assert message in text, (case, text)
            want = "404" if case == "model" else "400"
            grpc_want = "StatusCode.NOT_FOUND" if case == "model" else \
                "StatusCode.INVALID_ARGUMENT"
            assert str(status) == (want if module is httpclient else grpc_want), (case, status)
    # Over the upload limit: refused, not buffered without end.
    big = np.zeros((16, 3, 224, 224), np.float32)  # 9.6 MB > 8 MiB
    status, text = status_of(lambda: http.infer(ONNX, [infer_input(httpclient, "images", big)]))
    assert str(status) == "413" and "limit" in text
    status, _ = status_of(lambda: grpc.infer(ONNX, [infer_input(grpcclient, "images", big)]))
    assert str(status) == "StatusCode.RESOURCE_EXHAUSTED"
    # Still serving.
    assert http.infer(ONNX, [infer_input(httpclient, "images", good)]).as_numpy(
        "logits").shape == (1, 1000)


MALFORMED = [
    b"", b"not json", b"[]", b'{"inputs": 5}', b'{"inputs": [5]}', b'{"inputs": [{}]}',
    b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": "abc", "data": []}]}',
    b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [{"a": 1}]}]}',
    b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [-1]}]}',
    b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "parameters": [1]}]}',
    b'{"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1]}], '
    b'"outputs": [5]}',
    b'{"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1]}], '
    b'"parameters": {"timeout": "soon"}}',
    b'{"inputs": [{"name": "i", "datatype": "NOPE", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "i", "datatype": "FP32", "shape": [-3], "data": []}]}',
    b'{"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "data": ["no image"]}]}',
    b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_rest_requests_get_a_4xx_error(deployment: Deployment, body: bytes) -> None:
    for model in (ONNX, DETECTOR):
        r = httpx.post(f"{deployment.http_url}/v2/models/{model}/infer", content=body,
                       timeout=30)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert isinstance(r.json()["error"], str)
    r = httpx.post(f"{deployment.http_url}/v2/models/{ONNX}/infer", content=b"{}",
                   headers={"Inference-Header-Content-Length": "99"}, timeout=30)
    assert r.status_code == 400
