"""A synthetic world of untrimmed action videos, deterministic from a seed, with exact
ground truth in time.

One or two shapes of models/synthetic.py (circle, square, triangle, star; random colours)
sit on its textured backgrounds. Now and then one of them performs an action for 2-4 s
(ACTIONS); between actions come idle stretches of 1-3 s in which every shape is present
but still. Ground truth per video: the action segments (label, start_s, end_s); a clip
window's label is the one covering most of it, "none" (BACKGROUND) for idle time.
Frames are RGB uint8 at 25 fps; `write_mp4` encodes them as real H.264 (libx264, yuv420p).
"""

from __future__ import annotations

import dataclasses
import io
import math
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np

from .synthetic import CLASSES as SHAPES
from .synthetic import _background, _polygon

ACTIONS = ("move_left", "move_right", "grow", "shrink", "rotate", "blink")
BACKGROUND = "none"
LABELS = (BACKGROUND, *ACTIONS)  # class index order of the demo action classifier
FPS = 25
SIZE = (160, 120)  # (width, height)
SEGMENT_S = (2.0, 4.0)  # an action lasts this long
IDLE_S = (1.0, 3.0)  # still time between actions
_RADIUS = (0.1, 0.3)  # shape circumradius at the start, share of the frame height
_MIN_RADIUS, _MAX_RADIUS = 0.08, 0.36  # grow / shrink stay within these (share of height)
_NOISE_FRAMES = 8  # sensor noise: a few fields cycled over the frames (cheap, not static)
_MARGIN = 0.05  # a move stops this far from the frame's edge (share of the width)
_SUBPIXEL = 4  # cv2 drawing: coordinates in 1/16 px


@dataclasses.dataclass(frozen=True)
class Segment:
    label: str
    start_s: float
    end_s: float


@dataclasses.dataclass
class _Shape:
    kind: str
    colour: tuple[int, int, int]
    cx: float  # pixels
    cy: float
    r: float  # circumradius, pixels
    angle: float  # radians
    visible: bool = True


@dataclasses.dataclass(frozen=True)
class _Action:
    segment: Segment
    actor: int  # index of the shape that acts
    start: _Shape  # its state when the action begins
    amount: float  # move: signed px; grow/shrink: radius factor; rotate: rad/s; blink: s


@dataclasses.dataclass
class ActionVideo:
    """Frames # [N, H, W, 3] uint8 RGB at `fps`, and the action segments shown in them."""

    frames: np.ndarray
    fps: float
    segments: list[Segment]

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps

    def mp4(self, crf: int = 23) -> bytes:
        buf = io.BytesIO()
        write_mp4(buf, self.frames, self.fps, crf=crf)
        return buf.getvalue()

    def clip_label(self, start_s: float, clip_len: int, frame_rate: float) -> str:
        """The label of the clip of `clip_len` frames sampled at `frame_rate` from start_s."""
        return clip_label(self.segments, start_s, clip_len / frame_rate)

    def clip_coverage(self, start_s: float, clip_len: int, frame_rate: float) -> np.ndarray:
        """Share of the clip's window each of LABELS covers # [len(LABELS)], sums to 1."""
        return clip_coverage(self.segments, start_s, clip_len / frame_rate)

    def spans(self, min_idle_s: float = 1.0) -> list[Segment]:
        """The video as labelled stretches, in order: each action segment, and each idle
        stretch (BACKGROUND) of at least `min_idle_s` before, between and after them."""
        out, t = [], 0.0
        for seg in self.segments:
            if seg.start_s - t >= min_idle_s:
                out.append(Segment(BACKGROUND, t, seg.start_s))
            out.append(seg)
            t = seg.end_s
        if self.duration_s - t >= min_idle_s:
            out.append(Segment(BACKGROUND, t, self.duration_s))
        return out

    def cut(self, start_s: float, end_s: float) -> ActionVideo:
        """The frames shown in [start_s, end_s) as a video of their own: a trimmed clip.
        Its segments are the actions inside, clipped to it, on its own clock."""
        first = math.ceil(start_s * self.fps - 1e-6)
        frames = self.frames[first:math.ceil(end_s * self.fps - 1e-6)]
        t0, length = first / self.fps, len(frames) / self.fps
        segments = [Segment(s.label, max(s.start_s - t0, 0.0), min(s.end_s - t0, length))
                    for s in self.segments if s.start_s < end_s and s.end_s > start_s]
        return ActionVideo(frames, self.fps, segments)


def clip_coverage(segments: list[Segment], start_s: float, window_s: float) -> np.ndarray:
    """Share of [start_s, start_s + window_s) covered by each of LABELS # [len(LABELS)];
    time inside no segment counts for BACKGROUND."""
    out = np.zeros(len(LABELS), dtype=np.float32)
    end_s = start_s + window_s
    for seg in segments:
        overlap = min(end_s, seg.end_s) - max(start_s, seg.start_s)
        if overlap > 0:
            out[LABELS.index(seg.label)] += overlap / window_s
    out[0] = max(0.0, 1.0 - float(out[1:].sum()))
    return out


# A window that one label covers this much of is "clear"; the others straddle a boundary.
CLEAR_COVER = 0.75


def clip_label(segments: list[Segment], start_s: float, window_s: float) -> str:
    """The label covering most of the window (ties go to BACKGROUND)."""
    return LABELS[int(np.argmax(clip_coverage(segments, start_s, window_s)))]


def write_mp4(target: str | Path | BinaryIO, frames: np.ndarray, fps: float,
              crf: int = 23) -> None:
    """Encode frames # [N, H, W, 3] uint8 RGB (H, W even) as H.264 in MP4 at `fps`."""
    n, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {width}x{height}")
    rate = Fraction(fps).limit_denominator(1001)
    target = str(target) if isinstance(target, Path) else target
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _feasible(shape: _Shape, width: int, height: int) -> list[str]:
    margin = _MARGIN * width
    out = []
    if shape.cx - shape.r - margin > 0.2 * width:
        out.append("move_left")
    if width - margin - shape.r - shape.cx > 0.2 * width:
        out.append("move_right")
    room = min(shape.cx, width - shape.cx, shape.cy, height - shape.cy)
    if shape.r * 1.4 <= min(_MAX_RADIUS * height, room):
        out.append("grow")
    if shape.r / 1.4 >= _MIN_RADIUS * height:
        out.append("shrink")
    if shape.kind != "circle":  # a turning circle looks still
        out.append("rotate")
    out.append("blink")
    return out


def _amount(rng: np.random.Generator, label: str, shape: _Shape, duration_s: float,
            width: int, height: int) -> float:
    """How far the action goes: the planner checked `_feasible` first."""
    if label in ("move_left", "move_right"):
        margin = _MARGIN * width
        room = (shape.cx - shape.r - margin if label == "move_left"
                else width - margin - shape.r - shape.cx)
        speed = rng.uniform(0.12, 0.3) * width  # px/s: a visible step at 10 fps
        distance = min(room, speed * duration_s)
        return -distance if label == "move_left" else distance
    if label == "grow":
        room = min(shape.cx, width - shape.cx, shape.cy, height - shape.cy)
        top = min(_MAX_RADIUS * height, room) / shape.r
        return float(min(rng.uniform(1.5, 2.2), top))
    if label == "shrink":
        bottom = _MIN_RADIUS * height / shape.r
        return float(max(1 / rng.uniform(1.5, 2.2), bottom))
    if label == "rotate":
        return float(rng.choice([-1, 1]) * rng.uniform(1.5, 3.5))  # rad/s
    return float(rng.uniform(0.2, 0.4))  # blink: seconds shown, then as long hidden


def _during(action: _Action, t: float) -> _Shape:
    """The actor's state at time t (clamped to the action's span)."""
    seg, s = action.segment, action.start
    elapsed = min(max(t - seg.start_s, 0.0), seg.end_s - seg.start_s)
    p = elapsed / (seg.end_s - seg.start_s)
    label = seg.label
    if label in ("move_left", "move_right"):
        return dataclasses.replace(s, cx=s.cx + action.amount * p)
    if label in ("grow", "shrink"):
        return dataclasses.replace(s, r=s.r * action.amount ** p)
    if label == "rotate":
        return dataclasses.replace(s, angle=s.angle + action.amount * elapsed)
    hidden = p < 1 and int(elapsed / action.amount) % 2 == 1
    return dataclasses.replace(s, visible=not hidden)


def _new_shapes(rng: np.random.Generator, count: int, width: int, height: int) -> list[_Shape]:
    shapes = []
    for i in range(count):
        r = float(rng.uniform(*_RADIUS) * height)
        # Two shapes start in different halves, so they rarely hide each other.
        lo, hi = (r, width - r) if count == 1 else (
            (r, width / 2) if i == 0 else (width / 2, width - r))
        shapes.append(_Shape(
            kind=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=tuple(int(v) for v in rng.integers(0, 256, 3)),
            cx=float(rng.uniform(lo, max(lo, hi))), cy=float(rng.uniform(r, height - r)),
            r=r, angle=float(rng.uniform(0, 2 * math.pi))))
    return shapes


def _draw(canvas: np.ndarray, shape: _Shape) -> None:
    if not shape.visible:
        return
    k = 1 << _SUBPIXEL
    if shape.kind == "circle":
        cv2.circle(canvas, (round(shape.cx * k), round(shape.cy * k)), round(shape.r * k),
                   shape.colour, -1, cv2.LINE_AA, _SUBPIXEL)
        return
    pts = np.round(np.array(_polygon(shape.kind, shape.cx, shape.cy, shape.r, shape.angle))
                   * k).astype(np.int32)
    cv2.fillPoly(canvas, [pts], shape.colour, cv2.LINE_AA, _SUBPIXEL)


def _render(rng: np.random.Generator, shapes: list[_Shape], actions: list[_Action],
            n_frames: int, fps: float, width: int, height: int) -> np.ndarray:
    background = _background(rng, width, height).astype(np.int16)
    noise = rng.normal(0, 4, (_NOISE_FRAMES, height, width, 3)).astype(np.int16)
    order = rng.integers(_NOISE_FRAMES, size=n_frames)
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i in range(n_frames):
        t = i / fps
        canvas = np.clip(background + noise[order[i]], 0, 255).astype(np.uint8)
        for index, shape in enumerate(shapes):
            state = shape
            for action in actions:  # the latest action of this shape begun by t
                if action.actor == index and action.segment.start_s <= t:
                    state = _during(action, t)
            _draw(canvas, state)
        frames[i] = canvas
    return frames


def make_action_video(seed: int, duration_s: float | None = None, *, fps: float = FPS,
                      size: tuple[int, int] = SIZE, num_shapes: int | None = None
                      ) -> ActionVideo:
    """An untrimmed video: idle stretches and action segments alternating, 10-20 s
    unless `duration_s` is given. `size` is (width, height), both even."""
    rng = np.random.default_rng(seed)
    width, height = size
    duration_s = duration_s or float(rng.uniform(10, 20))
    shapes = _new_shapes(rng, num_shapes or int(rng.integers(1, 3)), width, height)
    current = list(shapes)  # each shape's state after the actions planned so far
    actions: list[_Action] = []
    t = float(rng.uniform(0.5, IDLE_S[1]))
    while True:
        length = float(rng.uniform(*SEGMENT_S))
        if t + length > duration_s - 0.5:
            break
        actor = int(rng.integers(len(shapes)))
        options = _feasible(current[actor], width, height)
        label = options[int(rng.integers(len(options)))]
        amount = _amount(rng, label, current[actor], length, width, height)
        action = _Action(Segment(label, round(t, 3), round(t + length, 3)), actor,
                         current[actor], amount)
        actions.append(action)
        current[actor] = _during(action, math.inf)
        t += length + float(rng.uniform(*IDLE_S))
    n_frames = round(duration_s * fps)
    frames = _render(rng, shapes, actions, n_frames, fps, width, height)
    return ActionVideo(frames, fps, [a.segment for a in actions])


def make_action_clip(label: str, seed: int, duration_s: float = 2.0, *, fps: float = FPS,
                     size: tuple[int, int] = SIZE) -> ActionVideo:
    """A trimmed video: one shape doing `label` (one of LABELS) from start to end."""
    if label not in LABELS:
        raise ValueError(f"unknown action '{label}'; expected one of {', '.join(LABELS)}")
    rng = np.random.default_rng(seed)
    width, height = size
    (shape,) = _new_shapes(rng, 1, width, height)
    # Start where the action has room: at the far side for a move, small to grow, etc.
    r = shape.r
    if label == "move_left":
        shape.cx = width - _MARGIN * width - r
    elif label == "move_right":
        shape.cx = _MARGIN * width + r
    elif label == "grow":
        shape = dataclasses.replace(shape, cx=width / 2, cy=height / 2,
                                    r=_RADIUS[0] * height)
    elif label == "shrink":
        shape = dataclasses.replace(shape, cx=width / 2, cy=height / 2,
                                    r=_RADIUS[1] * height)
    elif label == "rotate" and shape.kind == "circle":
        shape.kind = SHAPES[1 + int(rng.integers(len(SHAPES) - 1))]
    actions = []
    if label != BACKGROUND:
        amount = _amount(rng, label, shape, duration_s, width, height)
        actions.append(_Action(Segment(label, 0.0, duration_s), 0, shape, amount))
    frames = _render(rng, [shape], actions, round(duration_s * fps), fps, width, height)
    return ActionVideo(frames, fps, [a.segment for a in actions])
