"""Benchmark POST /classify-video: the service's wall time next to decode alone and the
model alone, on the same clips, in one table.

1. A 60 s 1280x720 H.264 video (30 fps, keyframe every 2 s, generated once and cached):
   for each sampling (--samplings), in interleaved rounds so that the machine's drift hits
   every column alike:
   - decode: PyAV decoding the clips the service samples (worker/video.read_clips: by
     timestamp, seeking to the keyframe before a clip), nothing else;
   - model: the served artifact on those clips, preprocessed beforehand, one clip per run
     (onnxruntime / TorchScript through cvserve's backend, as the worker loads it);
   - service: `cvserve run`, POST /classify-video with that sampling, wall time at the
     client.
   The issue's target: service <= 1.25 x max(decode, model), i.e. decode and inference
   overlap rather than add up.
2. A 10-minute video (320x240, keyframe every 10 s): 10 uniform clips, frames the decoder
   produced (from the answer) against the frames in the file, and the time, against
   decoding every frame.

    python bench/video_bench.py                    # r3d_18 (random weights, ONNX), ~6 min
    python bench/video_bench.py --rounds 2 --samplings num_clips=5
    python bench/video_bench.py --repository /tmp/vrepo --model demo-actions

Videos are cached in --cache (default /tmp/cvserve-video-bench).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
import torch
from detect_bench import Service, service_spec

from cvserve.app.settings import Settings
from cvserve.worker.backend import load_backend
from cvserve.worker.repository import load_config
from cvserve.worker.video import (
    DecodeStats,
    VideoLimits,
    clip_starts,
    probe_video,
    read_clips,
    sampling_rate,
)
from cvserve.worker.video_classification import clip_input

TARGET = 1.25  # service <= TARGET x max(decode, model)
LIMITS = VideoLimits(max_bytes=1 << 30, max_duration_s=7200, max_frames_decoded=10 ** 6)


def make_video(path: Path, seconds: float, size: tuple[int, int], fps: int, gop: int) -> bytes:
    """Smooth moving content (a drifting low-frequency texture and two moving squares) that
    compresses like camera footage, not like noise."""
    if path.is_file():
        return path.read_bytes()
    width, height = size
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    texture = torch.nn.functional.interpolate(
        torch.from_numpy(small).permute(2, 0, 1)[None].float(), scale_factor=16,
        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).byte().numpy()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps,
                                      options={"g": str(gop), "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        side = height // 6
        for i in range(int(seconds * fps)):
            frame = np.ascontiguousarray(texture[i % 16: i % 16 + height,
                                                 (2 * i) % 32: (2 * i) % 32 + width])
            x = int((np.sin(i / 20) + 1) / 2 * (width - side))
            y = int((np.cos(i / 31) + 1) / 2 * (height - side))
            frame[y:y + side, x:x + side] = (255, 64, 32)
            frame[height - y - side:height - y, width - x - side:width - x] = (32, 200, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@dataclass
class Plan:
    """One sampling of one video, as the service would make it."""

    label: str
    params: dict[str, float | int]
    starts: list[float]
    clip_len: int
    frame_rate: float


def plan(data: bytes, model_dir: Path, params: dict[str, float | int]) -> Plan:
    cfg = load_config(model_dir)
    assert cfg.video is not None
    info = probe_video(data, LIMITS)
    rate = sampling_rate(info, cfg.video.frame_rate, cfg.video.frame_stride)
    starts = clip_starts(info, cfg.video.clip_len, rate, **params)  # type: ignore[arg-type]
    label = ",".join(f"{k}={v}" for k, v in params.items())
    return Plan(label, params, starts, cfg.video.clip_len, rate)


def time_decode(data: bytes, p: Plan) -> tuple[float, DecodeStats]:
    stats = DecodeStats()
    t0 = time.perf_counter()
    for _ in read_clips(data, p.starts, p.clip_len, p.frame_rate, LIMITS, stats):
        pass
    return time.perf_counter() - t0, stats


def prepared_clips(data: bytes, p: Plan, model_dir: Path) -> list[np.ndarray]:
    cfg = load_config(model_dir)
    return [clip_input(clip, cfg)
            for clip in read_clips(data, p.starts, p.clip_len, p.frame_rate, LIMITS)]


def time_model(backend: object, input_name: str, clips: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for clip in clips:
        backend.run({input_name: clip[None]})  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def time_service(url: str, data: bytes, model: str, p: Plan) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/classify-video", params={"model": model, **p.params,
                                                    "async": "false", "timeout_s": 300},
                   files={"file": ("video.mp4", data, "video/mp4")}, timeout=330,
                   trust_env=False)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"/classify-video answered {r.status_code}: {r.text}")
    return elapsed, r.json()


def ensure_model(repository: Path, model: str) -> Path:
    if (repository / model / "model.toml").is_file():
        return repository / model
    from cvserve.models.video_export import export_video_classifier

    print(f"exporting {model} (random weights) into {repository} ...", flush=True)
    return export_video_classifier(model, repository, weights="random", fmt="onnx")


def parse_sampling(text: str) -> dict[str, float | int]:
    key, value = text.split("=")
    return {key: int(value) if key == "num_clips" else float(value)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="r3d_18")
    ap.add_argument("--repository", type=Path, default=None,
                    help="model repository (default: a temporary one)")
    ap.add_argument("--samplings", nargs="+", default=["num_clips=5", "num_clips=10",
                                                        "clip_stride_s=2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir())
                    / "cvserve-video-bench")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    repository = args.repository or Path(tempfile.mkdtemp(prefix="cvserve-vbench-"))
    model_dir = ensure_model(repository, args.model)
    print("generating / loading the videos ...", flush=True)
    hd = make_video(args.cache / "60s-720p.mp4", 60, (1280, 720), 30, 60)
    long = make_video(args.cache / "10min-240p.mp4", 600, (320, 240), 30, 300)
    plans = [plan(hd, model_dir, parse_sampling(s)) for s in args.samplings]

    settings = Settings(model_repository=repository)
    cfg = load_config(model_dir)
    backend = load_backend(cfg, settings)
    clips = {p.label: prepared_clips(hd, p, model_dir) for p in plans}
    time_model(backend, cfg.inputs[0], clips[plans[0].label][:1])  # first-run costs

    rows = []
    with tempfile.TemporaryDirectory() as logs:
        spec = service_spec(repository, model_dir.name, "auto", None)
        with Service(spec, Path(logs)):
            for p in plans:
                time_service(spec.url, hd, model_dir.name, p)  # first request's costs
                decode, model, service = [], [], []
                answer: dict = {}
                for _ in range(args.rounds):
                    decode.append(time_decode(hd, p)[0])
                    model.append(time_model(backend, cfg.inputs[0], clips[p.label]))
                    elapsed, answer = time_service(spec.url, hd, model_dir.name, p)
                    service.append(elapsed)
                d, m, s = (statistics.median(x) for x in (decode, model, service))
                rows.append({"sampling": p.label, "clips": len(p.starts),
                             "frames_decoded": answer["video"]["frames_decoded"],
                             "decode_s": d, "model_s": m, "service_s": s,
                             "vs_max": s / max(d, m), "vs_sum": s / (d + m)})
                print(f"  {p.label}: decode {d:.2f} s, model {m:.2f} s, service {s:.2f} s",
                      flush=True)
            long_plan = plan(long, model_dir, {"num_clips": 10})
            t_service, long_answer = time_service(spec.url, long, model_dir.name, long_plan)

    t0 = time.perf_counter()
    total_frames = sum(1 for _ in av.open(io.BytesIO(long)).decode(video=0))
    t_all = time.perf_counter() - t0
    t_clips, stats = time_decode(long, long_plan)

    print(f"\n/classify-video, {args.model} ({cfg.backend}), 60 s 1280x720 H.264 30 fps "
          f"(keyframe every 2 s); median of {args.rounds} interleaved rounds\n")
    print("| sampling | clips | frames decoded | decode s | model s | service s | "
          "service / max | service / sum |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sampling']} | {r['clips']} | {r['frames_decoded']} | "
              f"{r['decode_s']:.2f} | {r['model_s']:.2f} | {r['service_s']:.2f} | "
              f"{r['vs_max']:.2f} | {r['vs_sum']:.2f} |")
    print(f"\ntarget: service / max(decode, model) <= {TARGET}")
    print(f"\n10-minute 320x240 video, 10 uniform clips: decoded {stats.frames_decoded} of "
          f"{total_frames} frames ({stats.seeks} seeks) in {t_clips:.2f} s, against "
          f"{t_all:.2f} s for every frame; the service answered in {t_service:.2f} s "
          f"(its decoder: {long_answer['video']['frames_decoded']} frames)")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "long": {
            "frames_decoded": stats.frames_decoded, "frames_total": total_frames,
            "seeks": stats.seeks, "decode_clips_s": t_clips, "decode_all_s": t_all,
            "service_s": t_service}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
