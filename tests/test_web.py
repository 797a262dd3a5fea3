"""The web page at / (app/static/) in a real headless Chromium, against a real `cvserve run`.

One service serves the demo detector (shipped weights), the demo action classifier
(shipped weights), a ResNet-18 classifier and an LR-ASPP segmenter (random weights: /explain
and /segment answer, whatever they mean). The page's drawing is checked against the JSON
the same service answers to the same bytes sent here with httpx.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("selenium", reason="the web page tests drive Chromium with selenium "
                                        "(pip install selenium)")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"the web page tests need {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get "
                "install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from cvserve.models.synthetic import make_scene  # noqa: E402
from cvserve.models.synthetic_video import make_action_video  # noqa: E402

from .conftest import Service, embedded_service, iou  # noqa: E402

DETECTOR, VIDEO_MODEL, CLASSIFIER = "demo-detector", "demo-actions", "resnet18"
SEGMENTER = "lraspp_mobilenet_v3_large"
ASYNC_VIDEO_S = 12.0  # longer videos are answered as jobs (202 + polling)
WAIT_S = 90  # for a rendered answer (2 CPU cores, other tests maybe running beside)


@pytest.fixture(scope="module")
def service(every_task_repo: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"CVSERVE_MODEL_REPOSITORY": str(every_task_repo),
           "CVSERVE_ASYNC_VIDEO_DURATION_S": str(ASYNC_VIDEO_S)}
    with embedded_service(env, tmp_path_factory.mktemp("web-logs")) as svc:
        yield svc


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=ChromeService(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, service: Service) -> WebDriver:
    """The page freshly loaded, its model list read."""
    browser.get(f"{service.url}/")
    WebDriverWait(browser, 20).until(
        lambda d: len(Select(d.find_element(By.ID, "model")).options) > 1)
    return browser


# --- helpers -------------------------------------------------------------------------------------
def upload(driver: WebDriver, path: Path, task: str | None = None, **fields: str) -> None:
    """Choose the file, maybe a task and option values (by element id), and send."""
    driver.find_element(By.ID, "file").send_keys(str(path))
    if task is not None:
        Select(driver.find_element(By.ID, "task")).select_by_value(task)
    for element_id, value in fields.items():
        box = driver.find_element(By.ID, element_id.replace("_", "-"))
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "send").click()


def finished(driver: WebDriver, expect: str = "done") -> None:
    """Until #status reads done or error; it must read `expect`."""
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, WAIT_S).until(lambda d: status.text in ("done", "error"))
    if status.text != expect:
        error = driver.find_element(By.ID, "error").text
        pytest.fail(f"#status is {status.text!r}, expected {expect!r}; #error: {error!r}")


def post(service: Service, endpoint: str, data: bytes, name: str, **params: Any
         ) -> httpx.Response:
    return httpx.post(f"{service.url}/{endpoint}", params=params, files={"file": (name, data)},
                      headers={"accept": "application/json"}, timeout=120)


def rect(el: WebElement) -> dict[str, float]:
    return el.parent.execute_script("return arguments[0].getBoundingClientRect().toJSON()", el)


def near(a: float, b: float, tol: float = 2.0) -> bool:
    return abs(a - b) <= tol


def model_options(driver: WebDriver) -> list[str]:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "model")).options]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- tests ---------------------------------------------------------------------------------------
def test_detect_draws_one_box_per_detection(page: WebDriver, service: Service,
                                            tmp_path: Path) -> None:
    scene = make_scene(7)
    data = scene.jpeg()
    answer = post(service, "detect", data, "shapes.jpg", score_threshold=0.5).json()
    detections = answer["detections"]
    assert detections, "the demo detector finds shapes in scene 7"
    # The service under test really detects: some ground-truth shape is found.
    assert any(d["label"] == o.label and iou(d["box"], dict(zip(("x1", "y1", "x2", "y2"),
                                                                  o.box, strict=True))) >= 0.5
               for d in detections for o in scene.objects)

    assert model_options(page) == ["", DETECTOR]  # detect: detectors only, default first
    upload(page, write(tmp_path / "shapes.jpg", data), score_threshold="0.5")
    finished(page)
    boxes = page.find_elements(By.CSS_SELECTOR, ".stage .box")
    assert len(boxes) == len(detections)
    for box, det in zip(boxes, detections, strict=True):
        assert det["label"] in box.find_element(By.CLASS_NAME, "box-label").text
    # Boxes are scaled from the original pixels to the displayed image.
    img = rect(page.find_element(By.CSS_SELECTOR, ".stage img"))
    sx, sy = img["width"] / answer["image"]["width"], img["height"] / answer["image"]["height"]
    for box, det in zip(boxes, detections, strict=True):
        r, b = rect(box), det["box"]
        assert near(r["left"] - img["left"], b["x1"] * sx), (r, b)
        assert near(r["top"] - img["top"], b["y1"] * sy), (r, b)
        assert near(r["width"], (b["x2"] - b["x1"]) * sx), (r, b)
    assert re.search(r"total [\d.]+ ms", page.find_element(By.ID, "timing").text)

    page.save_screenshot(str(tmp_path / "detect.png"))
    if os.environ.get("CVSERVE_SCREENSHOT"):
        page.save_screenshot(os.environ["CVSERVE_SCREENSHOT"])


def test_classify_video_localized_shows_a_timeline(page: WebDriver, service: Service,
                                                   tmp_path: Path) -> None:
    video = make_action_video(3, duration_s=10.0)  # shorter than ASYNC_VIDEO_S: answered
    data = video.mp4()
    answer = post(service, "classify-video", data, "actions.mp4", localize="true").json()
    assert answer["segments"], f"localize finds an action in {video.segments}"

    page.find_element(By.ID, "file").send_keys(str(write(tmp_path / "actions.mp4", data)))
    task = Select(page.find_element(By.ID, "task"))  # picked for a video file
    WebDriverWait(page, 5).until(
        lambda _: task.first_selected_option.get_attribute("value") == "classify-video")
    assert model_options(page) == ["", VIDEO_MODEL]
    page.find_element(By.ID, "localize").click()
    page.find_element(By.ID, "send").click()
    finished(page)
    assert page.find_element(By.CSS_SELECTOR, ".stage video").get_attribute("src")
    tops = page.find_elements(By.CLASS_NAME, "top-label")
    assert [t.text.split()[0] for t in tops] == [t["label"] for t in answer["top"]]
    timeline = page.find_element(By.CLASS_NAME, "timeline")
    segments = timeline.find_elements(By.CLASS_NAME, "segment")
    assert len(segments) == len(answer["segments"]) >= 1
    line = rect(timeline)
    duration = answer["video"]["duration_s"]
    for seg, truth in zip(segments, answer["segments"], strict=True):
        assert seg.text == truth["label"] and truth["label"] in seg.get_attribute("title")
        r = rect(seg)
        assert near(r["left"] - line["left"], truth["start_s"] / duration * line["width"])
        assert near(r["width"], (truth["end_s"] - truth["start_s"]) / duration * line["width"])


def test_a_long_video_is_polled_as_a_job(page: WebDriver, service: Service,
                                         tmp_path: Path) -> None:
    video = make_action_video(1)  # 15 s: over ASYNC_VIDEO_S, so the POST answers 202
    assert video.duration_s > ASYNC_VIDEO_S
    upload(page, write(tmp_path / "long.mp4", video.mp4()))
    finished(page)
    assert page.find_elements(By.CLASS_NAME, "top-label")
    assert re.fullmatch(r"done: (\d+) / \1 clips", page.find_element(By.ID, "progress").text)


def test_explain_draws_a_heatmap_over_its_region(page: WebDriver, service: Service,
                                                 tmp_path: Path) -> None:
    data = make_scene(5, 400, 300).jpeg()
    upload(page, write(tmp_path / "photo.jpg", data), task="explain")
    finished(page)
    answer = post(service, "explain", data, "photo.jpg").json()
    heat = page.find_element(By.CSS_SELECTOR, ".stage canvas.heatmap")
    assert heat.is_displayed()
    assert heat.get_property("width") == answer["heatmap"]["shape"][1]
    img = rect(page.find_element(By.CSS_SELECTOR, ".stage img"))
    r, scale = rect(heat), img["width"] / 400
    x1, y1, x2, y2 = answer["heatmap"]["region"]
    assert near(r["left"] - img["left"], x1 * scale) and near(r["top"] - img["top"], y1 * scale)
    assert near(r["width"], (x2 - x1) * scale) and near(r["height"], (y2 - y1) * scale)
    assert answer["target"]["label"] in page.find_element(By.CLASS_NAME, "target").text


def test_segment_overlays_the_label_map_with_a_legend(page: WebDriver, service: Service,
                                                      tmp_path: Path) -> None:
    data = make_scene(9, 320, 240).jpeg()
    answer = post(service, "segment", data, "scene.jpg").json()
    upload(page, write(tmp_path / "scene.jpg", data), task="segment")
    finished(page)
    items = [li.text for li in page.find_elements(By.CLASS_NAME, "legend-item")]
    assert [t.rsplit(" ", 1)[0] for t in items] == [c["label"] for c in answer["classes"]]
    # The overlay's colour of each pixel depends on its class id alone (the page reads the
    # ids back from the palette PNG): one colour per id, transparent background, distinct
    # colours for distinct ids.
    ids = np.array(Image.open(io.BytesIO(base64.b64decode(answer["label_map"]["data"]))))
    rgba = np.array(page.execute_script(
        "const c = document.querySelector('canvas.labelmap');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);"),
        dtype=np.uint8).reshape(*ids.shape, 4)
    background = {c["class_id"] for c in answer["classes"] if c["label"] == "__background__"}
    seen: dict[int, np.ndarray] = {}
    for class_id in np.unique(ids):
        pixels = rgba[ids == class_id]
        if class_id in background:
            assert (pixels[:, 3] == 0).all()
            continue
        assert np.ptp(pixels.astype(int), axis=0).max() <= 2, class_id
        seen[int(class_id)] = pixels[0, :3].astype(int)
    colours = list(seen.values())
    assert all(np.abs(a - b).max() > 2 for i, a in enumerate(colours) for b in colours[i + 1:])


def test_an_error_shows_the_api_message_and_clears_results(page: WebDriver, service: Service,
                                                           tmp_path: Path) -> None:
    upload(page, write(tmp_path / "shapes.jpg", make_scene(7).jpeg()))
    finished(page)
    assert page.find_elements(By.CLASS_NAME, "box")
    text = b"not an image, just some words\n"
    expected = post(service, "detect", text, "notes.txt")
    assert expected.status_code == 415
    upload(page, write(tmp_path / "notes.txt", text), task="detect")
    finished(page, expect="error")
    error = page.find_element(By.ID, "error")
    assert error.is_displayed() and "error" in error.get_attribute("class").split()
    assert error.text == expected.json()["error"]["message"]
    assert not page.find_elements(By.CLASS_NAME, "box")

