"""Response shapes, as served in the OpenAPI schema (docs/design.md §5)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Box(BaseModel):
    """Corners in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float


class RLE(BaseModel):
    """COCO compressed RLE: `pycocotools.mask.decode({"size": size, "counts":
    counts.encode()})` gives the [height, width] mask back."""

    size: list[int] = Field(description="[height, width]")
    counts: str


class Keypoint(BaseModel):
    name: str
    x: float
    y: float
    score: float = Field(description="The keypoint head's logit (higher: more certain)")


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: Box
    mask: RLE | list[list[float]] | None = Field(
        None, description="Instance models: the mask in original pixels, COCO RLE or "
                          "(mask_format=polygon) COCO polygons [[x1, y1, x2, y2, ...], ...]")
    keypoints: list[Keypoint] | None = Field(None, description="Keypoint models")


class ImageSize(BaseModel):
    width: int
    height: int


class Timing(BaseModel):
    """Milliseconds spent in each stage of one request."""

    queue: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0


class DetectResponse(BaseModel):
    model: str
    image: ImageSize
    detections: list[Detection]
    timing: Timing


class SegmentClass(BaseModel):
    label: str
    class_id: int
    fraction: float = Field(description="Share of the image's pixels")
    mask: RLE | None = Field(None, description="With mask_format=rle")


class LabelMap(BaseModel):
    """The class index of every pixel at the original size, as a palette PNG (8-bit; 16-bit
    grayscale beyond 256 classes): `numpy.array(PIL.Image.open(...))` gives the indices."""

    format: str = "png"
    encoding: str = "base64"
    data: str


class SegmentResponse(BaseModel):
    """Semantic models: `classes` (+ `label_map`); instance models: `detections`."""

    model: str
    image: ImageSize
    classes: list[SegmentClass] | None = None
    label_map: LabelMap | None = None
    detections: list[Detection] | None = None
    timing: Timing


class ClassScore(BaseModel):
    label: str
    class_id: int
    score: float = Field(description="Class probability, averaged over the clips")


class VideoMeta(BaseModel):
    """What was decoded: the video as stored (upright) and how it was sampled."""

    duration_s: float
    fps: float
    width: int
    height: int
    codec: str
    rotation: int = Field(description="Degrees the frames were turned to stand upright")
    clips: int
    clip_len: int = Field(description="Frames per clip")
    frame_rate: float = Field(description="Frames per second sampled within a clip")
    frames_sampled: int
    frames_decoded: int = Field(description="Frames the decoder produced (seeking skips "
                                            "the rest)")
    seeks: int


class ClipScores(BaseModel):
    start_s: float
    end_s: float
    top: list[ClassScore]


class ActionSegment(BaseModel):
    label: str
    class_id: int
    start_s: float
    end_s: float
    score: float


class VideoTiming(Timing):
    """Milliseconds; preprocess is the decode and preprocessing of every clip, inference
    the time of every batch that held one of its clips (they overlap: not a sum)."""


class ClassifyVideoResponse(BaseModel):
    model: str
    top: list[ClassScore]
    video: VideoMeta
    clips: list[ClipScores] | None = Field(None, description="With clips=true: per clip")
    segments: list[ActionSegment] | None = Field(
        None, description="With localize=true: actions found, best first, after temporal NMS")
    timing: VideoTiming


class JobProgress(BaseModel):
    done: int = Field(description="Clips run so far")
    total: int | None = Field(None, description="Clips planned (known once decoding starts)")


class JobAccepted(BaseModel):
    job_id: str
    status: str = "queued"
    status_url: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class JobStatus(BaseModel):
    """A detached job: `result` (the endpoint's JSON answer) once `status` is done."""

    id: str
    model: str
    task: str
    status: str = Field(description="queued | running | done | failed")
    progress: JobProgress
    created_ms: int
    updated_ms: int
    deadline_ms: int
    result: dict[str, Any] | None = None
    error: ErrorDetail | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ExplainTarget(BaseModel):
    label: str
    class_id: int
    score: float = Field(description="The class's probability for this image")


class Heatmap(BaseModel):
    """Where the evidence for the target lies: rows of values in [0, 1] (1: the strongest)
    over `region` of the image, row 0 at its top; cell (i, j) covers the i-th of `shape[0]`
    equal bands of the region's height and the j-th of its width (occlusion: the patch
    positions, `stride` model pixels apart)."""

    shape: list[int]
    data: list[list[float]]
    region: list[float] = Field(description="x1, y1, x2, y2 in original pixels: the part "
                                            "of the image the model saw (a centre crop)")


class OcclusionInfo(BaseModel):
    patch: int = Field(description="Square patch side, model input pixels")
    stride: int
    positions: int = Field(description="Occluded copies run (batched)")


class ExplainResponse(BaseModel):
    model: str
    method: str
    layer: str | None = Field(None, description="gradcam, gradcam++, guided-gradcam: the "
                                                "module whose activations were used")
    target: ExplainTarget
    top: list[ExplainTarget] = Field(description="The top_k classes, best first")
    heatmap: Heatmap
    image: ImageSize
    occlusion: OcclusionInfo | None = None
    timing: Timing


class ModelInfo(BaseModel):
    name: str
    task: str
    backend: str
    platform: str | None = None
    device: str | None = None
    architecture: str | None = None
    weights: str
    weights_kind: str = Field(
        "pretrained", description="pretrained | demo | random: a task's default is the "
                                  "first kind served, in that order")
    labels: list[str] = Field(default_factory=list)
    input: dict[str, Any]
    output: dict[str, Any] = Field(default_factory=dict)
    batching: dict[str, Any]
    thresholds: dict[str, Any] = Field(default_factory=dict)
    video: dict[str, Any] | None = Field(None, description="video models: clip sampling "
                                                          "and layout")
    explain: dict[str, Any] | None = Field(None, description="classifiers: how /explain "
                                                             "rebuilds the eager module")
    explain_methods: list[str] = Field(default_factory=list,
                                       description="classifiers: the /explain methods served")
    batch_sizes: list[int] | None = None
    batching_policy: dict[str, Any] = Field(
        default_factory=dict, description="The measured throughput by batch size and the "
                                          "batch size / queue delay chosen from it")
    batch_mode: str = Field("dynamic", description="dynamic | dynamic (made symbolic, "
                                                  "verified) | fixed N | one graph per "
                                                  "batch size")
    tensors: dict[str, Any] | None = Field(
        None, description="The model's raw inputs and outputs (name, datatype, shape; -1: "
                          "any size), as /v2 infer takes and gives them")
    workers: list[str] = Field(default_factory=list, description="Live workers serving it")


class ModelList(BaseModel):
    models: list[ModelInfo]
