"""Video classification and temporal action localization (/classify-video).

The lecture's "train on clips, test by averaging clips": a video is sampled into clips of
`clip_len` frames at `frame_rate` fps (by timestamp, worker/video.py), each clip runs
through the model — batched with clips of the same and other videos — and the clips'
class probabilities are averaged. With `localize`, the clips are dense sliding windows
and their per-window probabilities become action segments (worker/localization.py).

    open:     probe the upload, plan the clip starts, open a decoder  (decode pool)
    advance:  decode the next clip, preprocess its frames              (decode pool)
    run:      a batch of clips -> class probabilities per clip         (model thread)
    finish:   average, top-k, timeline, segments                       (decode pool)
"""

from __future__ import annotations

import io
import threading
from collections.abc import Hashable
from typing import Any

import av
import numpy as np
import torch

from cvserve.app.errors import InputError
from cvserve.app.queue import Job, now_ms
from cvserve.app.settings import Settings

from . import explain_methods as em
from .backend import Backend
from .imaging import encode_png
from .localization import localize
from .preprocess import preprocess_frames
from .repository import ModelConfig, VideoSpec
from .task import Prepared, Stream, StreamingTask
from .video import (
    DecodeStats,
    VideoLimits,
    clip_starts,
    probe_video,
    read_clips,
    sampling_rate,
)

# /explain on a video model: Grad-CAM over time (worker/explain_methods.py).
VIDEO_METHODS = ("gradcam", "gradcam++")
THUMB_HEIGHT = 96  # px: a frame of the PNG strip

# Localization: a clip's window moves by this fraction of its length when the request and
# the model.toml name no clip_stride_s (half-overlapping windows).
DEFAULT_WINDOW_OVERLAP = 0.5


class VideoTask(StreamingTask):
    """video-classification and temporal-localization models (model.toml [video])."""

    def __init__(self, cfg: ModelConfig, backend: Backend, settings: Settings) -> None:
        super().__init__(cfg, backend, settings)
        assert cfg.video is not None  # ModelConfig fills it in for video tasks
        self.spec: VideoSpec = cfg.video
        self.limits = VideoLimits.from_settings(settings)
        self.background = (self.labels.index(self.spec.background_label)
                           if self.spec.background_label in self.labels else None)
        self._explainer: em.Explainer | None = None  # /explain's eager module, on first use
        self._explainer_lock = threading.Lock()

    def explainer(self) -> em.Explainer:
        """The eager module for /explain's Grad-CAM, built on first use (a video model
        serves /classify-video mostly; its eager copy costs memory only when asked for)."""
        if self.cfg.explain is None:
            raise InputError(f"model {self.cfg.name} cannot be explained: its model.toml "
                             "has no [explain] section (the eager module Grad-CAM needs)")
        with self._explainer_lock:
            if self._explainer is None:
                from cvserve.models.classifiers import build_eager

                net = build_eager(self.cfg.architecture, self.cfg.path,
                                  self.cfg.explain.weights, len(self.labels))
                self._explainer = em.Explainer(net, self.backend.device,
                                               self.cfg.explain.head, self.cfg.explain.layer)
            return self._explainer

    def methods(self) -> list[str]:
        return list(VIDEO_METHODS) if self.cfg.explain is not None else []

    # --- open: the plan ------------------------------------------------------------------
    def open(self, job: Job) -> Stream:
        p = job.params
        explain = self._explain_plan(p) if p.get("method") else None
        info = probe_video(job.payload, self.limits)
        clip_len = int(p.get("clip_len") or self.spec.clip_len)
        if clip_len != self.spec.clip_len and not self.spec.dynamic_clip_len:
            raise InputError(f"model '{self.cfg.name}' takes clips of exactly "
                             f"{self.spec.clip_len} frames; got clip_len={clip_len}")
        if clip_len < self.spec.min_clip_len:
            raise InputError(f"model '{self.cfg.name}' takes clips of at least "
                             f"{self.spec.min_clip_len} frames; got clip_len={clip_len}")
        if p.get("frame_rate") is not None or p.get("frame_stride") is not None:
            rate = sampling_rate(info, p.get("frame_rate"), p.get("frame_stride"))
        else:
            rate = sampling_rate(info, self.spec.frame_rate, self.spec.frame_stride)
        localizing = explain is None and (bool(p.get("localize"))
                                          or self.cfg.task == "temporal-localization")
        stride_s = p.get("clip_stride_s")
        num_clips = p.get("num_clips")
        if localizing and num_clips is not None:
            raise InputError("localize=true slides windows every clip_stride_s; num_clips "
                             "does not apply")
        if stride_s is None and num_clips is None:
            if localizing:
                stride_s = self.spec.clip_stride_s or (
                    clip_len / rate * (1 - DEFAULT_WINDOW_OVERLAP))
            else:  # /explain: one clip from the middle unless asked for more
                num_clips = 1 if explain is not None else self.spec.num_clips
        starts = clip_starts(info, clip_len, rate, num_clips=num_clips, clip_stride_s=stride_s)
        stats = DecodeStats()
        reader = read_clips(job.payload, starts, clip_len, rate, self.limits, stats)
        return Stream(job, total=len(starts), meta={
            "info": info, "starts": starts, "clip_len": clip_len, "frame_rate": rate,
            "localize": localizing, "reader": reader, "stats": stats, "explain": explain,
            "frames": {}})

    def _explain_plan(self, p: dict[str, Any]) -> dict[str, Any]:
        """/explain on a video: Grad-CAM (++) at a layer of the eager module, per clip."""
        method = p["method"]
        if method not in VIDEO_METHODS:
            raise InputError(f"a video model answers method={' or '.join(VIDEO_METHODS)}; "
                             f"got '{method}'")
        net = self.explainer()
        layer = p.get("layer") or net.layer
        try:
            em.module_at(net.net, layer)
        except KeyError as exc:
            raise InputError(f"model {self.cfg.name}: {exc.args[0]}") from exc
        if p.get("localize"):
            raise InputError("localize does not apply to /explain")
        target = em.parse_target(p.get("target"), self.labels, self.cfg.name)
        return {"method": method, "layer": layer, "target": target,
                "render": p.get("render")}

    # --- advance: one clip ---------------------------------------------------------------
    def advance(self, stream: Stream) -> Prepared:
        index = stream.produced
        clip = next(stream.meta["reader"])  # [T, H, W, 3] uint8 RGB, upright
        stream.produced += 1
        if stream.exhausted:
            stream.meta["reader"].close()  # the decoder's memory goes now, not at the end
        explain = stream.meta["explain"]
        meta: dict[str, Any] = {}
        if explain is not None:
            meta = {"kind": explain["method"], "layer": explain["layer"],
                    "target": explain["target"]}
            if explain["render"]:  # the strip's frames, small: the clip itself goes now
                stream.meta["frames"][index] = thumbnails(clip)
        return Prepared(stream.job, clip_input(clip, self.cfg), meta, stream=stream,
                        index=index)

    def batch_key(self, item: Prepared) -> Hashable:
        """Clips of one size and length stack into one tensor; /explain's clips batch with
        those of the same method and layer."""
        return item.meta.get("kind"), item.meta.get("layer"), item.inputs.shape

    # --- run: class probabilities per clip ----------------------------------------------
    def run(self, batch: list[Prepared]) -> list[Any]:
        kind = batch[0].meta.get("kind")
        if kind is not None:
            return self._run_explain(batch, kind, batch[0].meta["layer"])
        name = self.cfg.inputs[0]
        if self.spec.layout == "frames":
            # An image classifier on every frame; a clip's score is its frames' mean.
            frames = np.concatenate([item.inputs for item in batch])  # [B*T, ...]
            limit = self.backend.batch_limit or len(frames)
            logits = np.concatenate([
                self.backend.run({name: frames[i:i + limit]})[self.cfg.outputs[0]]
                for i in range(0, len(frames), limit)])
            probs = self._activate(logits)
            t = batch[0].inputs.shape[0]
            return list(probs.reshape(len(batch), t, -1).mean(axis=1))
        clips = np.stack([item.inputs for item in batch])  # [B, 3, T, h, w] / [B, T, 3, h, w]
        logits = self.backend.run({name: clips})[self.cfg.outputs[0]]
        return list(self._activate(logits))

    def _run_explain(self, batch: list[Prepared], kind: str, layer: str
                     ) -> list[dict[str, Any]]:
        """Grad-CAM over T x H x W on the eager module: # [B, K, t, h, w] at the layer ->
        maps [B, t, h, w] in [0, 1]."""
        if self.spec.layout != "NCTHW":
            raise InputError(f"/explain takes NCTHW video models; {self.cfg.name} is "
                             f"{self.spec.layout}")
        x = torch.from_numpy(np.stack([item.inputs for item in batch]))
        maps, logits, chosen = self.explainer().run(
            kind, x, [item.meta["target"] for item in batch], layer)
        probs = self._activate(logits.float().cpu().numpy())
        maps = maps.float().cpu().numpy()
        return [{"probs": probs[i], "map": maps[i], "target": int(chosen[i])}
                for i in range(len(batch))]

    def _activate(self, logits: np.ndarray) -> np.ndarray:
        """# [N, K] logits -> [N, K] class scores (the model.toml's activation)."""
        x = torch.from_numpy(np.asarray(logits, dtype=np.float32).reshape(len(logits), -1))
        if self.cfg.output.activation == "softmax":
            x = x.softmax(dim=1)
        elif self.cfg.output.activation == "sigmoid":
            x = x.sigmoid()
        return x.numpy()

    # --- finish: the answer --------------------------------------------------------------
    def finish_stream(self, stream: Stream) -> tuple[dict[str, Any], bytes | None]:
        if stream.meta["explain"] is not None:
            return self._finish_explain(stream)
        p, meta = stream.job.params, stream.meta
        info, starts = meta["info"], meta["starts"]
        clip_s = meta["clip_len"] / meta["frame_rate"]
        probs = np.stack(stream.outputs)  # [clips, K]
        top_k = int(p.get("top_k") or 5)
        mean = probs.mean(axis=0)
        result: dict[str, Any] = {
            "top": self._top(mean, top_k),
            "video": {"duration_s": round(info.duration_s, 3), "fps": round(info.fps, 3),
                      "width": info.width, "height": info.height, "codec": info.codec,
                      "rotation": info.rotation, "clips": len(starts),
                      "clip_len": meta["clip_len"], "frame_rate": round(meta["frame_rate"], 3),
                      "frames_sampled": len(starts) * meta["clip_len"],
                      "frames_decoded": meta["stats"].frames_decoded,
                      "seeks": meta["stats"].seeks},
        }
        if p.get("clips"):
            result["clips"] = [
                {"start_s": round(start, 3), "end_s": round(min(start + clip_s,
                                                                 info.duration_s), 3),
                 "top": self._top(row, min(top_k, 5))}
                for start, row in zip(starts, probs, strict=True)]
        if meta["localize"]:
            segments = localize(np.asarray(starts), clip_s, probs, self.labels,
                                info.duration_s, background=self.background,
                                **{k: p[k] for k in ("score_threshold", "nms_iou",
                                                     "max_segments") if p.get(k) is not None})
            result["segments"] = [
                {"label": s.label, "class_id": s.class_id, "start_s": round(s.start_s, 3),
                 "end_s": round(s.end_s, 3), "score": round(s.score, 4)} for s in segments]
        return result, None

    def _finish_explain(self, stream: Stream) -> tuple[dict[str, Any], bytes | None]:
        """Per clip: its target, and one heatmap per sampled frame (the map's t steps
        interpolated linearly to the clip's frames, as the frames were sampled)."""
        meta, p = stream.meta, stream.job.params
        info, starts, explain = meta["info"], meta["starts"], meta["explain"]
        clip_len, rate = meta["clip_len"], meta["frame_rate"]
        clips, strips = [], []
        for index, (start, out) in enumerate(zip(starts, stream.outputs, strict=True)):
            frames = frame_maps(out["map"], clip_len)  # [T, h, w]
            target = out["target"]
            clips.append({
                "start_s": round(start, 3),
                "end_s": round(min(start + clip_len / rate, info.duration_s), 3),
                "target": {"label": self.label(target), "class_id": target,
                           "score": round(float(out["probs"][target]), 6)},
                "frames": [{"time_s": round(start + t / rate, 3),
                            "heatmap": {"shape": list(frames[t].shape),
                                        "data": em.grid_json(frames[t])}}
                           for t in range(len(frames))]})
            if explain["render"]:
                strips.append(overlay_strip(meta["frames"][index], frames,
                                            overlay=explain["render"] == "overlay"))
        if explain["render"]:
            return {}, encode_png(torch.cat(strips, dim=1))
        mean = np.mean([out["probs"] for out in stream.outputs], axis=0)
        return {"method": explain["method"], "layer": explain["layer"],
                "target": clips[0]["target"],
                "top": self._top(mean, int(p.get("top_k") or 5)),
                "clips": clips,
                "video": {"duration_s": round(info.duration_s, 3), "fps": round(info.fps, 3),
                          "width": info.width, "height": info.height,
                          "clip_len": clip_len, "frame_rate": round(rate, 3)}}, None

    def _top(self, scores: np.ndarray, k: int) -> list[dict[str, Any]]:
        order = np.argsort(-scores, kind="stable")[:k]
        return [{"label": self.label(int(i)), "class_id": int(i),
                 "score": round(float(scores[i]), 6)} for i in order]

    # --- warm-up ---------------------------------------------------------------------------
    def warmup_jobs(self) -> list[Job]:
        """Two short generated videos (a moving gradient), encoded as H.264 MP4."""
        return [Job(model=self.cfg.name, task=self.cfg.task, deadline_ms=now_ms() + 3_600_000,
                    payload=_warmup_video(seed), params={"num_clips": 1})
                for seed in range(2)]


def clip_input(clip: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A decoded clip # [T, H, W, 3] uint8 RGB -> the model's input for it: [3, T, h, w]
    (NCTHW), [T, 3, h, w] (NTCHW, frames) or [T, h, w, 3] (NHWC frames).

    Each frame goes through [input] with torch's uint8 resize kernel: what torchvision's
    video presets run (they resize uint8 frames), and ~8x faster on decoded frames."""
    assert cfg.video is not None
    frames = torch.from_numpy(clip).permute(0, 3, 1, 2)  # [T, 3, H, W], channels-last view
    x, _ = preprocess_frames(frames, cfg.input, uint8_kernel=True)
    if cfg.video.layout == "NCTHW":
        x = np.ascontiguousarray(np.moveaxis(x, 0, 1))
    return x


def _warmup_video(seed: int, seconds: float = 2.0, fps: int = 25) -> bytes:
    """A small real video: enough frames for any clip the warm-up asks for."""
    rng = np.random.default_rng(seed)
    height, width = 240, 320
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.roll(base, shift=4 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def frame_maps(maps: np.ndarray, clip_len: int) -> np.ndarray:
    """# [t, h, w] Grad-CAM over a layer's t time steps -> [clip_len, h, w], linearly
    interpolated in time (half-step centres, as the layer's steps cover the clip)."""
    t = torch.from_numpy(np.asarray(maps, dtype=np.float32))  # [t, h, w]
    steps, h, w = t.shape
    series = t.reshape(steps, h * w).T[:, None]  # [h * w, 1, t]: one series per cell
    out = torch.nn.functional.interpolate(series, size=clip_len, mode="linear",
                                          align_corners=False)  # [h * w, 1, clip_len]
    return out[:, 0].T.reshape(clip_len, h, w).numpy()


def thumbnails(clip: np.ndarray) -> torch.Tensor:
    """# [T, H, W, 3] uint8 -> [T, 3, THUMB_HEIGHT, w] uint8, the aspect kept."""
    frames = torch.from_numpy(clip).permute(0, 3, 1, 2)
    h, w = frames.shape[-2:]
    size = (THUMB_HEIGHT, max(1, round(w * THUMB_HEIGHT / h)))
    return torch.nn.functional.interpolate(frames.float(), size=size, mode="bilinear",
                                           antialias=True).round().clamp(0, 255).byte()


def overlay_strip(frames: torch.Tensor, maps: np.ndarray, overlay: bool) -> torch.Tensor:
    """One clip as a row of its frames, each with its heatmap (JET) over it at half opacity
    (or alone). # [T, 3, h, w] uint8, [T, mh, mw] -> [3, h, T * w] uint8"""
    from .explain import colour_map

    t, _, h, w = frames.shape
    heat = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(h, w),
                                           mode="bilinear", align_corners=False)[:, 0]
    colour = colour_map(heat)
    out = (0.5 * frames.float() + 0.5 * colour.float()) if overlay else colour.float()
    return out.round().clamp(0, 255).byte().permute(1, 2, 0, 3).reshape(3, h, t * w)
