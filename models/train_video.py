"""Train the demo action classifier (models/c3d.py) on synthetic untrimmed videos
(models/synthetic_video.py), on the CPU, and export it as a served video model.

The clips it learns from are made the way the server makes them: each generated video is
encoded as H.264 (a random CRF per video, so the codec's artefacts vary), decoded by
worker/video.read_clips (frames at FRAME_RATE fps, chosen by timestamp) and resized and
normalized as model.toml's [input] (INPUT) declares, with worker/preprocess's
arithmetic. Targets are soft: the share of each clip's window that each label covers, so
a clip across a boundary is taught as what it is. Augmentation: mirroring (move_left <->
move_right) and time reversal (move_left <-> move_right, grow <-> shrink).

    python -m cvserve.models.train_video --steps 300 --seed 0 --out models/demo/actions_c3d.pt
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cvserve.worker.preprocess import resize_uint8
from cvserve.worker.repository import InputSpec
from cvserve.worker.video import VideoLimits, clip_starts, probe_video, read_clips

from .c3d import C3D
from .export import ExportError, _quiet_exporters, move_into_place, write_model_toml
from .synthetic_video import CLEAR_COVER, LABELS, make_action_clip, make_action_video

log = logging.getLogger("cvserve.train")

DEMO_ACTIONS = Path(__file__).resolve().parent / "demo" / "actions_c3d.pt"
CLIP_LEN = 16
FRAME_RATE = 10.0  # fps sampled: a clip spans 1.6 s
CLIP_STRIDE_S = 0.4  # localization windows
# model.toml [input]: frames stretched to 60x80 (half of the 160x120 videos), Kinetics'
# mean / std as torchvision's video models use.
INPUT = {"layout": "NCHW", "color": "RGB", "scale": 1 / 255,
         "mean": [0.43216, 0.394666, 0.37645], "std": [0.22803, 0.22145, 0.216989],
         "resize": "stretch", "size": [60, 80], "antialias": True, "dtype": "float32"}
VIDEO = {"layout": "NCTHW", "clip_len": CLIP_LEN, "dynamic_clip_len": True,
         "frame_rate": FRAME_RATE, "num_clips": 5, "clip_stride_s": CLIP_STRIDE_S,
         "background_label": LABELS[0]}
OUTPUT = {"decoder": "classification-logits", "activation": "softmax"}
BATCHING = {"max_batch_size": 8, "max_queue_delay_ms": 5.0}
HELD_OUT_SEED = 10_000_000  # evaluation videos: seeds from here, far from training's
MAX_PROB_DIFF = 1e-4  # export check: |softmax(artifact) - softmax(eager)|
# Label permutations (indices into LABELS) under augmentation.
_MIRROR = [LABELS.index(n) for n in ("none", "move_right", "move_left", "grow", "shrink",
                                     "rotate", "blink")]
_REVERSE = [LABELS.index(n) for n in ("none", "move_right", "move_left", "shrink", "grow",
                                      "rotate", "blink")]
_LIMITS = VideoLimits()


def _uint8_spec() -> InputSpec:
    """INPUT without its normalization: decode_clips then returns resized uint8 pixels."""
    return InputSpec(**{**INPUT, "dtype": "uint8"})


def decode_clips(mp4: bytes, starts: list[float], spec: InputSpec,
                 clip_len: int = CLIP_LEN, frame_rate: float = FRAME_RATE) -> np.ndarray:
    """Clips as the server makes them: read_clips, then INPUT's resize (stretch) and
    normalization; tests/test_synthetic_video.py checks it equals worker/preprocess's
    `preprocess` frame by frame. # -> [N, 3, T, H, W] in spec.dtype"""
    if spec.resize != "stretch" or spec.color != "RGB" or spec.layout != "NCHW":
        raise ValueError("decode_clips implements resize = 'stretch', RGB, NCHW only")
    out = []
    for clip in read_clips(mp4, starts, clip_len, frame_rate, _LIMITS):
        # One resize call per clip: per-frame calls cost ~10 ms each in thread wake-ups
        # on a busy 2-core machine, for ~0.1 ms of work.
        frames = _resize(torch.from_numpy(clip).permute(0, 3, 1, 2), spec)  # [T, 3, H, W]
        out.append(frames.permute(1, 0, 2, 3))  # [3, T, H, W]
    clips = torch.stack(out)
    if spec.dtype == "uint8":
        return clips.numpy()
    return _normalize(clips, spec).numpy().astype(spec.dtype, copy=False)


def _resize(frames: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """The server's resize of video frames (worker/video_classification.clip_input).
    # [N, 3, h, w] uint8 -> [N, 3, H, W] uint8"""
    return resize_uint8(frames, spec.size, spec.antialias, uint8_kernel=True)


def _normalize(clips: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None, None]
    return (clips.float() * spec.scale - mean) / std


def normalize(clips: torch.Tensor) -> torch.Tensor:
    """The rest of INPUT after the resize: # uint8 [B, 3, T, H, W] -> float32."""
    return _normalize(clips, InputSpec(**INPUT))


def _chunk(rng: np.random.Generator, seeds: list[int], clips_per_video: int,
           spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips from freshly generated videos -> uint8 [N, 3, T, H, W], targets [N, K]."""
    clips, targets = [], []
    span = CLIP_LEN / FRAME_RATE
    for seed in seeds:
        video = make_action_video(seed)
        mp4 = video.mp4(crf=int(rng.integers(18, 34)))
        last = max(0.0, probe_video(mp4, _LIMITS).duration_s - span)
        starts = sorted(float(s) for s in rng.uniform(0, last, clips_per_video))
        clips.append(decode_clips(mp4, starts, spec))
        targets += [video.clip_coverage(s, CLIP_LEN, FRAME_RATE) for s in starts]
    return torch.from_numpy(np.concatenate(clips)), torch.from_numpy(np.stack(targets))


def _augment(gen: torch.Generator, clips: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    clips, targets = clips.clone(), targets.clone()
    mirror = torch.rand(len(clips), generator=gen) < 0.5
    clips[mirror] = clips[mirror].flip(-1)
    targets[mirror] = targets[mirror][:, _MIRROR]
    reverse = torch.rand(len(clips), generator=gen) < 0.5
    clips[reverse] = clips[reverse].flip(2)
    targets[reverse] = targets[reverse][:, _REVERSE]
    return clips, targets


def _batches(seed: int, batch_size: int, videos_per_chunk: int, clips_per_video: int,
             passes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches: each chunk of generated videos is seen `passes` times."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    spec = _uint8_spec()
    next_video = seed * 1_000_003
    while True:
        seeds = list(range(next_video, next_video + videos_per_chunk))
        next_video += videos_per_chunk
        clips, targets = _chunk(rng, seeds, clips_per_video, spec)
        for _ in range(passes):
            order = torch.randperm(len(clips), generator=gen)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[i:i + batch_size]
                yield _augment(gen, clips[idx], targets[idx])


def train_actions(out: Path, *, steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
                  seed: int = 0, videos_per_chunk: int = 12, clips_per_video: int = 16,
                  passes: int = 3, init: Path | None = None) -> Path:
    """Train C3D from random weights (or continue from checkpoint `init`); returns the
    checkpoint path (state_dict + labels)."""
    torch.manual_seed(seed)
    model = load_actions(init)[0] if init is not None else C3D(len(LABELS))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    batches = _batches(seed, batch_size, videos_per_chunk, clips_per_video, passes)
    t0 = time.perf_counter()
    for step in range(steps):
        clips, targets = next(batches)
        loss = F.cross_entropy(model(normalize(clips)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "labels": list(LABELS)}, out)
    return out


def load_actions(weights: Path = DEMO_ACTIONS) -> tuple[C3D, list[str]]:
    """The eager model from a train_actions checkpoint, in eval mode, and its labels."""
    if not Path(weights).is_file():
        raise ExportError(f"no action classifier weights at {weights}; train them with "
                          "`python -m cvserve.models.train_video`")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    labels = list(state["labels"])
    model = C3D(len(labels))
    model.load_state_dict(state["model"])
    return model.eval(), labels


def evaluate_actions(model: C3D, num_videos: int = 20, first_seed: int = HELD_OUT_SEED,
                     clip_stride_s: float = CLIP_STRIDE_S, batch_size: int = 16
                     ) -> dict[str, float]:
    """Clip accuracy on held-out videos: every localization window of each, decoded from
    its MP4 and preprocessed as the server does, against the window's majority label.
    `clear`: only windows that one label covers for >= CLEAR_COVER (75 %)."""
    spec = InputSpec(**INPUT)
    right = total = clear_right = clear_total = 0
    model.eval()
    for seed in range(first_seed, first_seed + num_videos):
        video = make_action_video(seed)
        mp4 = video.mp4()
        starts = clip_starts(probe_video(mp4, _LIMITS), CLIP_LEN, FRAME_RATE,
                             clip_stride_s=clip_stride_s)
        clips = torch.from_numpy(decode_clips(mp4, starts, spec))
        with torch.inference_mode():
            pred = torch.cat([model(clips[i:i + batch_size]).argmax(1)
                              for i in range(0, len(clips), batch_size)])
        for start, p in zip(starts, pred.tolist(), strict=True):
            cover = video.clip_coverage(start, CLIP_LEN, FRAME_RATE)
            hit = p == int(np.argmax(cover))
            right, total = right + hit, total + 1
            if cover.max() >= CLEAR_COVER:
                clear_right, clear_total = clear_right + hit, clear_total + 1
    return {"accuracy": right / total, "clear_accuracy": clear_right / max(clear_total, 1),
            "windows": total, "clear_windows": clear_total}


def check_clips() -> list[torch.Tensor]:
    """Export check inputs, decoded from MP4s of trimmed clips: a batch of 2 at clip_len,
    and one clip of half the length (the graph's T is dynamic). # each [B, 3, T, H, W]"""
    spec = InputSpec(**INPUT)

    def clip(label: str, seed: int, clip_len: int) -> np.ndarray:
        mp4 = make_action_clip(label, seed).mp4()
        return decode_clips(mp4, [0.0], spec, clip_len=clip_len)

    pair = np.concatenate([clip("grow", 1, CLIP_LEN), clip("move_left", 2, CLIP_LEN)])
    return [torch.from_numpy(pair), torch.from_numpy(clip("blink", 3, CLIP_LEN // 2))]


def _run_artifact(path: Path, video: torch.Tensor) -> torch.Tensor:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"video": video.numpy()})
        return torch.from_numpy(logits)
    with _quiet_exporters():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(video)


def verify(model: C3D, artifact: Path) -> str:
    """Artifact vs eager softmax on check_clips(); raises ExportError past MAX_PROB_DIFF."""
    report = []
    for video in check_clips():
        with torch.inference_mode():
            ref = model(video).softmax(1)
        got = _run_artifact(artifact, video).softmax(1)
        if got.shape != ref.shape:
            raise ExportError(f"{artifact.name} gives logits {tuple(got.shape)} for input "
                              f"{tuple(video.shape)}; expected {tuple(ref.shape)}")
        diff = float((got - ref).abs().max())
        if diff > MAX_PROB_DIFF:
            raise ExportError(f"{artifact.name} differs from the eager model by {diff:.1e} "
                              f"in softmax on input {tuple(video.shape)}, over "
                              f"{MAX_PROB_DIFF:g}")
        report.append(f"{tuple(video.shape)}: max |prob diff| {diff:.1e}")
    return "; ".join(report)


def _write_artifact(model: C3D, out: Path, fmt: str) -> str:
    if fmt == "torchscript":
        with _quiet_exporters():
            torch.jit.script(model).save(str(out / "model.pt"))
        return "model.pt"
    h, w = INPUT["size"]
    example = torch.zeros(1, 3, CLIP_LEN, h, w)
    with torch.no_grad(), _quiet_exporters():
        torch.onnx.export(
            model, (example,), str(out / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["video"], output_names=["logits"],
            dynamic_axes={"video": {0: "batch", 2: "time"}, "logits": {0: "batch"}},
        )
    return "model.onnx"


def export_demo_actions(repository: Path, weights: Path = DEMO_ACTIONS, fmt: str = "onnx",
                        name: str = "demo-actions") -> Path:
    """Check and write `repository/name/` (model.toml, labels.txt, artifact)."""
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--format must be onnx or torchscript, got '{fmt}'")
    model, labels = load_actions(Path(weights))
    repository = Path(repository)
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        file = _write_artifact(model, out, fmt)
        log.info("checked %s against the eager model: %s", name, verify(model, out / file))
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        write_model_toml(out / "model.toml", {
            "task": "video-classification", "backend": fmt, "file": file,
            "architecture": "c3d_small",
            "weights": f"demo ({Path(weights).name}, trained on models/synthetic_video.py)",
            "weights_kind": "demo", "labels": "labels.txt",
            "inputs": ["video"], "outputs": ["logits"],
        }, {"input": INPUT, "output": OUTPUT, "video": VIDEO, "batching": BATCHING,
            # /explain's Grad-CAM over time: conv4b's output (the end of `features`)
            "explain": {"weights": "weights.pt", "layer": "features", "head": "head.2"}})
        torch.save(model.state_dict(), out / "weights.pt")
        return move_into_place(out, repository, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO_ACTIONS)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this checkpoint (use another --seed: new videos)")
    parser.add_argument("--eval-videos", type=int, default=20,
                        help="held-out videos to measure clip accuracy on (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    train_actions(args.out, steps=args.steps, seed=args.seed, init=args.init)
    log.info("trained in %.0f s -> %s", time.perf_counter() - t0, args.out)
    if args.eval_videos:
        model, _ = load_actions(args.out)
        log.info("held out: %s", evaluate_actions(model, args.eval_videos))


if __name__ == "__main__":
    main()
