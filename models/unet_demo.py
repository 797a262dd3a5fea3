"""The demo semantic segmenter: a small U-Net (Ronneberger et al. 2015, "U-Net:
Convolutional Networks for Biomedical Image Segmentation") trained on the synthetic shapes
of models/synthetic.py, so that /segment has a real model to serve and measure offline.

The lecture's encoder-decoder with skip connections: an encoder of double 3x3 convolution
blocks, each followed by 2x2 max-pooling, down to 1/16 of the input; a decoder that
upsamples with 2x2 stride-2 transposed convolutions, concatenates the encoder's feature
map of the same resolution (the skip connection) and fuses the two with another double
convolution; a 1x1 convolution to the 5 classes (background, then CLASSES). The input
goes through the demo classifier's EdgeStem first: the shapes and backgrounds have random
colours, and a fixed edge-strength channel is what made them learnable there.

Data: make_scene scenes (1-4 shapes, 240-640 px a side), JPEG-encoded, decoded and
stretched to 160x160 as the server does (model.toml [input], worker.preprocess). The
label map is each object's class id where its visible mask is, 0 elsewhere; the training
target is that map's one-hot resized like the image (the share of each class under each
input pixel), so that the logits, resized back to the image bilinearly as /segment does,
put class boundaries where the full-resolution ones are.

    python -m cvserve.models.unet_demo --steps 1600 --minutes 19 --out /tmp/unet_run1.pt
    python -m cvserve.models.unet_demo --steps 2000 --minutes 18 --seed 1 --first-scene 1500 \
        --init /tmp/unet_run1.pt            # the shipped models/demo/unet.pt (README.md)
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvserve.worker.repository import InputSpec

from .classifier_demo import EdgeStem, served_input, served_inputs
from .export import ExportError, _quiet_exporters, export_scripted
from .synthetic import CLASSES, Scene, make_scene

log = logging.getLogger("cvserve.train")

DEMO_UNET = Path(__file__).resolve().parent / "demo" / "unet.pt"
ARCH = "demo_unet"
LABELS = ("background", *CLASSES)  # class id = index; 0 is background, as in make_scene
WIDTHS = (8, 16, 32, 64, 128)  # encoder levels 1 .. 5 (level 5: the bottleneck, 1/16)
INPUT_SIZE = 160  # model input, square; a multiple of 16 so that every skip matches
INPUT = {"layout": "NCHW", "color": "RGB", "scale": 1 / 255,
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
         "resize": "stretch", "size": [INPUT_SIZE, INPUT_SIZE], "antialias": True}
OUTPUT = {"decoder": "semantic-logits"}
# Fixed-size inputs batch whatever their image size; requests already queued batch, none
# waits for a batch to fill (as the demo classifier).
BATCHING = {"max_batch_size": 8, "max_queue_delay_ms": 0.0}
HELD_OUT_SEED = 1_000_000  # evaluation scenes: seeds from here; training uses 0 .. pool - 1
CHECK_SEED = 1_500_000  # the export check's scenes, apart from both
LOGIT_TOL = 1e-4  # |artifact - eager| on logits


# --- model --------------------------------------------------------------------------------

def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions (padded: the size is kept), each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True))


class Up(nn.Module):
    """# x [B, cin, h, w], skip [B, cout, 2h, 2w] -> [B, cout, 2h, 2w]: a 2x2 stride-2
    transposed convolution, the skip concatenated, a double convolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.fuse = double_conv(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([skip, self.up(x)], 1))


class DemoUNet(nn.Module):
    """# images [B, 3, H, W] normalized RGB, H and W multiples of 16 -> logits [B, 5, H, W]

    stem: EdgeStem (4 channels); enc1 .. enc5: double convolutions at 1, 1/2 .. 1/16 of
    the input (8, 16, 32, 64, 128 channels), each after a 2x2 max-pool but the first;
    up4 .. up1: transposed convolution to the next level up, concatenated with that
    level's encoder output, double convolution; head: 1x1 convolution to the classes.
    """

    def __init__(self, num_classes: int = len(LABELS),
                 widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = EdgeStem()
        self.encoders = nn.ModuleList(
            double_conv(cin, cout) for cin, cout in zip((4, *widths[:-1]), widths, strict=True))
        self.pool = nn.MaxPool2d(2)
        # Deepest first: up[0] takes the bottleneck to level 4, up[-1] reaches level 1.
        self.ups = nn.ModuleList(Up(cin, cout) for cin, cout in
                                 zip(widths[:0:-1], widths[-2::-1], strict=True))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck's output is x itself
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


def load_demo_unet(weights: Path = DEMO_UNET) -> DemoUNet:
    """The eager model from a state_dict file (train's output), in eval mode."""
    if not Path(weights).is_file():
        raise ExportError(f"no demo U-Net weights at {weights}; train them with "
                          "`python -m cvserve.models.unet_demo`")
    model = DemoUNet()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


# --- data ---------------------------------------------------------------------------------

def label_map(scene: Scene) -> np.ndarray:
    """Ground truth: # [H, W] uint8, each object's class id on its visible mask, else 0.
    An object make_scene drops (under half visible) stays background here, as in its GT."""
    labels = np.zeros(scene.image.size[::-1], dtype=np.uint8)
    for obj in scene.objects:
        labels[obj.mask] = obj.class_id
    return labels


def _uint8_spec() -> InputSpec:
    """INPUT without its normalization: preprocess then returns resized uint8 pixels."""
    return InputSpec(**{**INPUT, "dtype": "uint8"})


def normalize(images: torch.Tensor) -> torch.Tensor:
    """INPUT's scale and mean / std: # uint8 [B, 3, H, W] -> float32 [B, 3, H, W]"""
    mean = torch.tensor(INPUT["mean"])[:, None, None]
    std = torch.tensor(INPUT["std"])[:, None, None]
    return (images.float() * INPUT["scale"] - mean) / std


def class_shares(labels: np.ndarray, samples: int = 4) -> np.ndarray:
    """The share of each class under each model-input pixel, the label map sampled at
    samples x samples points inside it (the input's pixel grid stretched over the image, as
    the image is). # [H, W] -> uint8 [5, 160, 160], 255 = all of it

    Not the image's own antialiased resize of a one-hot map: as good a target and ten
    times cheaper (11 vs 115 ms a 640 px scene), which is most of the data's cost.
    """
    height, width = labels.shape
    offsets = (np.arange(samples) + 0.5) / samples
    points = (np.arange(INPUT_SIZE)[:, None] + offsets).ravel() / INPUT_SIZE  # [160 * s]
    rows = np.minimum((points * height).astype(np.int64), height - 1)
    cols = np.minimum((points * width).astype(np.int64), width - 1)
    sampled = labels[rows][:, cols]  # [160 * s, 160 * s]
    onehot = sampled[None] == np.arange(len(LABELS), dtype=np.uint8)[:, None, None]
    counts = onehot.reshape(len(LABELS), INPUT_SIZE, samples, INPUT_SIZE, samples).sum((2, 4))
    return np.round(counts * (255 / samples**2)).astype(np.uint8)


def _training_sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene `seed` -> (image uint8 [3, 160, 160], JPEG-decoded and resized as served;
    class shares uint8 [5, 160, 160])."""
    torch.set_num_threads(1)  # one scene per process, as many processes as cores
    scene = make_scene(seed)
    return served_input(scene.jpeg(), _uint8_spec())[0].numpy(), class_shares(label_map(scene))


def _pool(n: int, seed: int = 0, workers: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training scenes seed .. seed + n - 1 -> images uint8 [n, 3, 160, 160], class shares
    uint8 [n, 5, 160, 160]; generated by `workers` processes (default: one per core)."""
    # spawn, not fork: a forked child can inherit a torch thread pool mid-use and hang.
    with ProcessPoolExecutor(workers or os.cpu_count() or 1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        samples = list(pool.map(_training_sample, range(seed, seed + n), chunksize=64))
    return (torch.from_numpy(np.stack([image for image, _ in samples])),
            torch.from_numpy(np.stack([shares for _, shares in samples])))


def _augment(gen: torch.Generator, *maps: torch.Tensor) -> list[torch.Tensor]:
    """The same random flips and transpose on images and targets [B, C, H, W] alike: no
    class changes under them."""
    maps = [m.clone() for m in maps]
    for flip in (lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.transpose(-1, -2)):
        chosen = torch.rand(len(maps[0]), generator=gen) < 0.5
        for m in maps:
            m[chosen] = flip(m[chosen])
    return maps


# --- training -----------------------------------------------------------------------------

def one_cycle(progress: float, peak: float, warmup: float = 0.15) -> float:
    """The learning rate at `progress` (0 .. 1) through training: up linearly from peak / 25
    over `warmup`, then a cosine down to peak / 1000 (OneCycleLR's shape)."""
    if progress < warmup:
        return peak * (0.04 + 0.96 * progress / warmup)
    done = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * done)))


def train(steps: int = 1200, out: Path = DEMO_UNET, seed: int = 0, *, batch_size: int = 8,
          lr: float = 3e-3, pool_size: int = 1500, first_scene: int = 0,
          minutes: float | None = None, init: Path | None = None) -> Path:
    """Train on scenes first_scene .. first_scene + pool_size - 1 from random weights, or
    from a state_dict file (`init`: one more cycle); writes the state_dict.

    Loss: cross-entropy against each pixel's class shares (soft targets). With `minutes`,
    training also ends once that much time (data included) has passed, the schedule
    following whichever of steps and time runs out first: on shared cores the step time
    varies threefold, and a schedule cut short would end at a high learning rate.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images, shares = _pool(pool_size, first_scene)
    log.info("%d training scenes in %.0f s", pool_size, time.perf_counter() - t0)
    model = (load_demo_unet(init) if init else DemoUNet()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    budget_s = minutes * 60 if minutes else math.inf
    step, progress = 0, 0.0
    while progress < 1:
        for group in opt.param_groups:
            group["lr"] = one_cycle(progress, lr)
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x, target = _augment(gen, images[idx], shares[idx])
        target = target.float()
        loss = F.cross_entropy(model(normalize(x)), target / target.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        progress = max(step / steps, elapsed / budget_s)
        if step % 50 == 1 or progress >= 1:
            log.info("step %d (%.0f%%) loss %.3f lr %.1e (%.0f s)", step, 100 * progress,
                     loss.item(), opt.param_groups[0]["lr"], elapsed)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


# --- evaluation ---------------------------------------------------------------------------

def confusion(truth: np.ndarray, predicted: np.ndarray,
              num_classes: int = len(LABELS)) -> np.ndarray:
    """Pixel counts [true class, predicted class]. # [H, W], [H, W] -> [C, C] int64"""
    if truth.shape != predicted.shape:
        raise ValueError(f"label maps differ in shape: truth {truth.shape}, predicted "
                         f"{predicted.shape}")
    index = truth.astype(np.int64).ravel() * num_classes + predicted.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """Per class TP / (TP + FP + FN) over all pixels counted; nan for a class neither true
    nor predicted anywhere. # [C, C] -> [C]"""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def held_out_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[bytes, np.ndarray]]:
    """Scenes seed .. seed + n - 1 -> (JPEG bytes, ground-truth label map [H, W])."""
    return [(scene.jpeg(), label_map(scene)) for scene in map(make_scene, range(seed, seed + n))]


@torch.inference_mode()
def predict(model: nn.Module, jpegs: list[bytes]) -> list[np.ndarray]:
    """Label maps at each image's own size: served preprocessing, logits resized to the
    original bilinearly, argmax (what /segment answers). # -> [H, W] uint8 each"""
    spec = InputSpec(**INPUT)
    inputs, sizes = zip(*(served_input(jpeg, spec) for jpeg in jpegs), strict=True)
    logits = model(torch.stack(inputs))
    return [F.interpolate(one[None], size=(height, width), mode="bilinear",
                          align_corners=False)[0].argmax(0).to(torch.uint8).numpy()
            for one, (width, height) in zip(logits, sizes, strict=True)]


def evaluate(model: nn.Module, n: int = 200, seed: int = HELD_OUT_SEED,
             batch_size: int = 25) -> dict:
    """Held-out mIoU over background + the 4 classes, pixels at full resolution, on scenes
    seed .. seed + n - 1: {"miou", "iou" {label: IoU}, "pixel_accuracy", "confusion"
    [5][5] (rows: truth), "scenes"}."""
    model.eval()
    matrix = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    for start in range(seed, seed + n, batch_size):
        scenes = held_out_scenes(min(batch_size, seed + n - start), start)
        for (_, truth), predicted in zip(scenes, predict(model, [j for j, _ in scenes]),
                                         strict=True):
            matrix += confusion(truth, predicted)
    return summarize(matrix, n)


def summarize(matrix: np.ndarray, scenes: int) -> dict:
    """A confusion matrix -> evaluate's report."""
    iou = class_iou(matrix)
    return {"miou": float(np.nanmean(iou)),
            "iou": {label: float(v) for label, v in zip(LABELS, iou, strict=True)},
            "pixel_accuracy": float(np.trace(matrix) / matrix.sum()),
            "confusion": matrix.tolist(), "scenes": scenes}


# --- export -------------------------------------------------------------------------------

def check_batch(n: int = 3) -> torch.Tensor:
    """Scenes of neither the training nor the held-out seeds, through the serving
    preprocess. # [n, 3, 160, 160] float32"""
    return served_inputs([jpeg for jpeg, _ in held_out_scenes(n, CHECK_SEED)],
                         InputSpec(**INPUT))


def verify(model: DemoUNet, artifact: Path) -> str:
    """Artifact vs the eager model on a batch of 3; raises ExportError."""
    images = check_batch(3)
    with _quiet_exporters():
        module = torch.jit.load(str(artifact), map_location="cpu")
    with torch.inference_mode():
        ref = model(images)
        got = module(images)
    if got.shape != ref.shape:
        raise ExportError(f"{artifact.name} gives logits {tuple(got.shape)} for input "
                          f"{tuple(images.shape)}; expected {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    if diff > LOGIT_TOL:
        raise ExportError(f"{artifact.name} disagrees with the eager model: max |logit diff| "
                          f"{diff:.2e} > {LOGIT_TOL:g}")
    return f"max |logit diff| {diff:.1e}"


def export_demo_unet(repository: Path, name: str = "demo-unet",
                     weights: Path = DEMO_UNET) -> Path:
    """Check and write `repository/name/` (model.toml, labels.txt, model.pt)."""
    model = load_demo_unet(Path(weights))
    # Scripted: no data-dependent control flow, any batch size.
    return export_scripted(repository, name, model, lambda artifact: verify(model, artifact),
                           LABELS, {
        "task": "semantic-segmentation", "backend": "torchscript", "file": "model.pt",
        "architecture": ARCH,
        "weights": f"demo ({Path(weights).name}, trained on models/synthetic.py)",
        "weights_kind": "demo", "labels": "labels.txt",
        "inputs": ["images"], "outputs": ["logits"],
    }, {"input": INPUT, "output": OUTPUT, "batching": BATCHING})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=1500, help="training scenes")
    parser.add_argument("--first-scene", type=int, default=0,
                        help="the training scenes' first seed")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (a state_dict) instead of random ones")
    parser.add_argument("--minutes", type=float, default=None,
                        help="also end training after this many minutes (data included)")
    parser.add_argument("--out", type=Path, default=DEMO_UNET)
    parser.add_argument("--eval-scenes", type=int, default=200,
                        help="held-out scenes to measure mIoU on (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    train(args.steps, args.out, args.seed, pool_size=args.pool,
          first_scene=args.first_scene, minutes=args.minutes, init=args.init)
    log.info("trained in %.0f s -> %s", time.perf_counter() - t0, args.out)
    if args.eval_scenes:
        result = evaluate(load_demo_unet(args.out), args.eval_scenes)
        ious = ", ".join(f"{k} {v:.3f}" for k, v in result["iou"].items())
        print(f"held out ({args.eval_scenes} scenes from seed {HELD_OUT_SEED}): mIoU "
              f"{result['miou']:.3f} ({ious}); pixel accuracy "
              f"{result['pixel_accuracy']:.3f}; confusion (rows: truth) {result['confusion']}")


if __name__ == "__main__":
    main()
