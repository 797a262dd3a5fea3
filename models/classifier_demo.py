"""The demo image classifier: a small CNN, global average pooling and one linear layer,
trained on the synthetic shapes of models/synthetic.py, so that class activation maps
(Zhou et al. 2016, "Learning Deep Features for Discriminative Localization") are exact:
logits = fc(mean over H, W of the last feature map), hence
CAM_c = sum_k fc.weight[c, k] * A_k, whose mean over H, W plus fc.bias[c] is logit c.

One image is one scene with exactly one shape, the target (make_scene with max_objects=1:
a second shape would be an unlabelled distractor, and the label and the box the pointing
game checks would no longer mean one object); the backgrounds are make_scene's own noisy
gradients and stripes. Sides are drawn from 96-256 px, each image JPEG-encoded, decoded
and stretched to 128x128 as the server does (model.toml [input]).

    python -m cvserve.models.classifier_demo --steps 3000 --out models/demo/classifier.pt
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvserve.worker.imaging import decode_rgb
from cvserve.worker.preprocess import preprocess
from cvserve.worker.repository import InputSpec

from .export import ExportError, _quiet_exporters, export_scripted
from .synthetic import CLASSES, Scene, make_scene

log = logging.getLogger("cvserve.train")

DEMO_CLASSIFIER = Path(__file__).resolve().parent / "demo" / "classifier.pt"
ARCH = "demo_gap_cnn"
WIDTHS = (24, 48, 96, 128)  # stage1 .. stage4 output channels
EXPLAIN_LAYER = "features.stage4"  # the feature map GAP pools: CAM's layer, Grad-CAM's default
INPUT_SIZE = 128  # model input, square; the feature map is INPUT_SIZE / 16 = 8 a side
INPUT = {"layout": "NCHW", "color": "RGB", "scale": 1 / 255,
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
         "resize": "stretch", "size": [INPUT_SIZE, INPUT_SIZE], "antialias": True}
OUTPUT = {"decoder": "classification-logits", "activation": "softmax", "features": "features"}
# Up to 16 images a batch; the measured policy (model.toml default) times each size at
# load and keeps only what raises throughput. No waiting for a batch to fill, as for
# efficientnet-lite0: requests already queued still batch.
BATCHING = {"max_batch_size": 16, "max_queue_delay_ms": 0.0}
MIN_SIDE, MAX_SIDE = 96, 256  # scene width and height, px, drawn uniformly
HELD_OUT_SEED = 1_000_000  # evaluation scenes: seeds from here; training uses 0 .. pool - 1
POINTING_TOLERANCE_PX = 15  # Zhang et al. 2016's 15 px margin around the box
LOGIT_TOL = 1e-4  # |artifact - eager| on logits
CAM_TOL = 1e-5  # |logits - fc(mean(features))| within one artifact


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EdgeStem(nn.Module):
    """# images [B, 3, H, W] -> [B, 4, H, W]: an edge-strength channel, then the RGB.

    The edge channel is the Sobel gradient magnitude of each colour channel, summed over
    the channels: large on a shape's outline whatever its colour and its background's.
    Fixed, not learned. Why: the shapes and backgrounds have random colours, and from RGB
    alone the network's loss stayed at chance (ln 4) for 1,200 steps, with SGD or AdamW,
    on whole images or zoomed crops; with this channel it learns in a few hundred steps.
    It is differentiable, so gradients still reach the pixels (saliency, guided backprop).
    """

    def __init__(self) -> None:
        super().__init__()
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        # [6, 1, 3, 3]: d/dx and d/dy for each of the 3 colour channels (groups=3)
        self.register_buffer("kernels", torch.stack([sobel_x, sobel_x.t()])[:, None]
                             .repeat(3, 1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        grad = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), self.kernels, groups=3)
        magnitude = (grad.pow(2).view(b, 3, 2, h, w).sum(2) + 1e-6).sqrt().sum(1, keepdim=True)
        return torch.cat([magnitude, images], 1)


class DemoClassifier(nn.Module):
    """# images [B, 3, 128, 128] normalized RGB -> logits [B, 4]

    features.stem adds an edge channel (EdgeStem); features.stage1 .. stage4 each halve
    the resolution (a 3x3 stride-2 convolution; stages 2-4 add a 3x3 stride-1 one, for a
    receptive field of 87 px), each convolution followed by BatchNorm and ReLU; then the
    mean over H, W and `fc`. 416k parameters.
    """

    def __init__(self, num_classes: int = len(CLASSES),
                 widths: tuple[int, int, int, int] = WIDTHS) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(OrderedDict(
            stem=EdgeStem(),  # [B, 4, 128, 128]
            stage1=nn.Sequential(*_conv(4, c1, 2)),  # [B, 24, 64, 64]
            stage2=nn.Sequential(*_conv(c1, c2, 2), *_conv(c2, c2, 1)),  # [B, 48, 32, 32]
            stage3=nn.Sequential(*_conv(c2, c3, 2), *_conv(c3, c3, 1)),  # [B, 96, 16, 16]
            stage4=nn.Sequential(*_conv(c3, c4, 2), *_conv(c4, c4, 1)),  # [B, 128, 8, 8]
        ))
        self.fc = nn.Linear(c4, num_classes)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits [B, 4], features [B, 128, H/16, W/16] (features.stage4's output)"""
        features = self.features(images)
        return self.fc(features.mean((2, 3))), features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[0]


class LogitsAndFeatures(nn.Module):
    """The served artifact: # images [B, 3, 128, 128] -> (logits [B, 4], features
    [B, 128, 8, 8])."""

    def __init__(self, net: DemoClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_features(images)


def load_demo_classifier(weights: Path = DEMO_CLASSIFIER) -> DemoClassifier:
    """The eager model from a state_dict file (train's output), in eval mode."""
    if not Path(weights).is_file():
        raise ExportError(f"no demo classifier weights at {weights}; train them with "
                          "`python -m cvserve.models.classifier_demo`")
    model = DemoClassifier()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


# --- data ---------------------------------------------------------------------------------

def target_scene(seed: int) -> Scene:
    """One shape (the target) on a textured background, MIN_SIDE-MAX_SIDE px a side."""
    rng = np.random.default_rng([seed, 1])  # the size's own stream, apart from make_scene's
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    return make_scene(seed, width, height, max_objects=1)


def pointing_scenes(n: int, seed: int = HELD_OUT_SEED
                    ) -> Iterator[tuple[bytes, int, tuple[float, float, float, float]]]:
    """Scenes seed .. seed + n - 1 -> (JPEG bytes, class id (0-based, CLASSES order),
    the target's box xyxy in image pixels)."""
    for s in range(seed, seed + n):
        scene = target_scene(s)
        (target,) = scene.objects
        yield scene.jpeg(), target.class_id - 1, target.box


def _uint8_spec() -> InputSpec:
    """INPUT without its normalization: preprocess then returns resized uint8 pixels."""
    return InputSpec(**{**INPUT, "dtype": "uint8"})


def served_input(jpeg: bytes, spec: InputSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """A JPEG decoded and preprocessed as the server does (worker/preprocess).
    # -> [3, H, W] in spec's dtype, the image's (width, height)"""
    rgb, info = decode_rgb(jpeg, 10**8)
    return torch.from_numpy(preprocess(rgb, spec)[0]), (info.width, info.height)


def model_input(jpeg: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
    """A JPEG decoded and resized as the server does.
    # -> uint8 [3, 128, 128], the image's (width, height)"""
    return served_input(jpeg, _uint8_spec())


def normalize(images: torch.Tensor) -> torch.Tensor:
    """INPUT's scale and mean / std: # uint8 [B, 3, H, W] -> float32 [B, 3, H, W]"""
    mean = torch.tensor(INPUT["mean"])[:, None, None]
    std = torch.tensor(INPUT["std"])[:, None, None]
    return (images.float() * INPUT["scale"] - mean) / std


def _zoom(rgb: torch.Tensor, box: tuple[float, float, float, float],
          rng: np.random.Generator) -> torch.Tensor:
    """A square window around the target, 1.3-2.5 times its longer side, shifted by up to a
    quarter of that, clipped to the image. # [3, h, w] uint8 -> [3, h', w'] uint8"""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * rng.uniform(1.3, 2.5)
    cx, cy = (x1 + x2) / 2 + rng.uniform(-0.25, 0.25) * side, (y1 + y2) / 2 + rng.uniform(
        -0.25, 0.25) * side
    height, width = rgb.shape[1:]
    left, top = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
    right, bottom = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
    return rgb[:, top:bottom, left:right].contiguous()


def _pool(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training scenes 0 .. n - 1 -> whole images uint8 [n, 3, 128, 128], zoomed onto the
    target uint8 [n, 3, 128, 128], labels [n]."""
    rng = np.random.default_rng(seed)
    spec = _uint8_spec()
    whole, zoomed, labels = [], [], []
    for jpeg, class_id, box in pointing_scenes(n, 0):
        rgb, _ = decode_rgb(jpeg, 10**8)
        whole.append(torch.from_numpy(preprocess(rgb, spec)[0]))
        zoomed.append(torch.from_numpy(preprocess(_zoom(rgb, box, rng), spec)[0]))
        labels.append(class_id)
    return torch.stack(whole), torch.stack(zoomed), torch.tensor(labels)


def _augment(gen: torch.Generator, images: torch.Tensor) -> torch.Tensor:
    """Random horizontal and vertical flips and transposes: no class changes under them."""
    images = images.clone()
    for flip in (lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.transpose(-1, -2)):
        chosen = torch.rand(len(images), generator=gen) < 0.5
        images[chosen] = flip(images[chosen])
    return images


# --- training -----------------------------------------------------------------------------

def train(steps: int = 3000, out: Path = DEMO_CLASSIFIER, seed: int = 0, *,
          batch_size: int = 32, lr: float = 2e-3, pool_size: int = 5000,
          zoom_share: float = 0.5) -> Path:
    """Train from random weights on scenes 0 .. pool_size - 1; writes the state_dict.

    A share of each batch (zoom_share) is zoomed onto the target, where its outline is more
    than a sliver of the pooled map.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    whole, zoomed, labels = _pool(pool_size, seed)
    log.info("%d training scenes in %.0f s", pool_size, time.perf_counter() - t0)
    model = DemoClassifier().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    for step in range(steps):
        idx = torch.randint(len(whole), (batch_size,), generator=gen)
        zoom = (torch.rand(batch_size, generator=gen) < zoom_share)[:, None, None, None]
        images = _augment(gen, torch.where(zoom, zoomed[idx], whole[idx]))
        loss = F.cross_entropy(model(normalize(images)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


# --- evaluation ---------------------------------------------------------------------------

def pointing_game(heatmap: np.ndarray, box: tuple[float, float, float, float],
                  image_size: tuple[int, int],
                  tolerance_px: float = POINTING_TOLERANCE_PX) -> bool:
    """Zhang et al. 2016 ("Top-down Neural Attention by Excitation Backprop"): a hit when
    the heatmap's maximum lies within the box enlarged by tolerance_px on every side.

    heatmap: [h, w] over the whole image (any resolution; its cell centres are mapped to
    image pixels); box: x1, y1, x2, y2 in image pixels; image_size: (width, height), px.
    On ties the first maximum in row-major order counts.
    """
    h, w = heatmap.shape
    width, height = image_size
    row, col = np.unravel_index(int(np.argmax(heatmap)), (h, w))
    return inside_box(((col + 0.5) * width / w, (row + 0.5) * height / h), box, tolerance_px)


def inside_box(point: tuple[float, float], box: tuple[float, float, float, float],
               tolerance_px: float = POINTING_TOLERANCE_PX) -> bool:
    """Whether (x, y) lies within the box x1, y1, x2, y2 enlarged by tolerance_px a side."""
    x, y = point
    x1, y1, x2, y2 = box
    return (x1 - tolerance_px <= x <= x2 + tolerance_px
            and y1 - tolerance_px <= y <= y2 + tolerance_px)


def class_activation_map(model: DemoClassifier, features: torch.Tensor,
                         class_id: int) -> torch.Tensor:
    """CAM: relu(sum_k fc.weight[c, k] * A_k). # features [128, h, w] -> [h, w]"""
    return torch.relu(torch.einsum("k,khw->hw", model.fc.weight[class_id], features))


def evaluate(model: DemoClassifier, n: int = 200, seed: int = HELD_OUT_SEED,
             batch_size: int = 50) -> dict[str, float]:
    """Held-out accuracy (eager, served preprocessing) and the pointing game hit rate of
    exact CAM for the ground-truth class, on scenes seed .. seed + n - 1."""
    scenes = list(pointing_scenes(n, seed))
    right = hits = 0
    model.eval()
    for i in range(0, n, batch_size):
        chunk = scenes[i:i + batch_size]
        inputs = [model_input(jpeg) for jpeg, _, _ in chunk]
        with torch.inference_mode():
            logits, features = model.forward_with_features(
                normalize(torch.stack([x for x, _ in inputs])))
            for (_, class_id, box), (_, size), scores, fmap in zip(
                    chunk, inputs, logits, features, strict=True):
                right += int(scores.argmax()) == class_id
                cam = class_activation_map(model, fmap, class_id).numpy()
                hits += pointing_game(cam, box, size)
    return {"accuracy": right / n, "pointing_game": hits / n, "scenes": n}


# --- export -------------------------------------------------------------------------------

def served_inputs(jpegs: list[bytes], spec: InputSpec) -> torch.Tensor:
    """JPEGs decoded and preprocessed as the server does. # [n, 3, H, W] (spec's dtype)"""
    return torch.stack([served_input(jpeg, spec)[0] for jpeg in jpegs])


def check_batch(n: int = 3) -> torch.Tensor:
    """Held-out-style scenes through the serving preprocess. # [n, 3, 128, 128] float32"""
    return served_inputs([jpeg for jpeg, _, _ in pointing_scenes(n, HELD_OUT_SEED + 500_000)],
                         InputSpec(**INPUT))


def verify(model: DemoClassifier, artifact: Path) -> str:
    """Artifact vs the eager model on a batch of 3; raises ExportError."""
    images = check_batch(3)
    with _quiet_exporters():
        module = torch.jit.load(str(artifact), map_location="cpu")
    with torch.inference_mode():
        ref = model(images)
        logits, features = module(images)
        pooled = model.fc(features.mean((2, 3)))
    side = INPUT_SIZE // 16
    expected = (len(images), WIDTHS[-1], side, side)
    if logits.shape != ref.shape or tuple(features.shape) != expected:
        raise ExportError(f"{artifact.name} gives logits {tuple(logits.shape)} and features "
                          f"{tuple(features.shape)}; expected {tuple(ref.shape)} and {expected}")
    diff = float((logits - ref).abs().max())
    if diff > LOGIT_TOL:
        raise ExportError(f"{artifact.name} disagrees with the eager model: max |logit diff| "
                          f"{diff:.2e} > {LOGIT_TOL:g}")
    cam_diff = float((pooled - logits).abs().max())
    if cam_diff > CAM_TOL:
        raise ExportError(f"{artifact.name}: logits differ from fc(mean(features)) by "
                          f"{cam_diff:.2e} > {CAM_TOL:g}; CAM from its features is not exact")
    return f"max |logit diff| {diff:.1e}, |logits - fc(mean(features))| {cam_diff:.1e}"


def export_demo_classifier(repository: Path, name: str = "demo-classifier",
                           weights: Path = DEMO_CLASSIFIER) -> Path:
    """Check and write `repository/name/` (model.toml, labels.txt, model.pt, and
    weights.pt: /explain's gradient methods rebuild the eager module from it)."""
    model = load_demo_classifier(Path(weights))
    # Scripted: no data-dependent control flow, and any batch size.
    return export_scripted(repository, name, LogitsAndFeatures(model),
                           lambda artifact: verify(model, artifact), CLASSES, {
        "task": "classification", "backend": "torchscript", "file": "model.pt",
        "architecture": ARCH,
        "weights": f"demo ({Path(weights).name}, trained on models/synthetic.py)",
        "weights_kind": "demo", "labels": "labels.txt",
        "inputs": ["images"], "outputs": ["logits", "features"],
    }, {"input": INPUT, "output": OUTPUT, "batching": BATCHING,
        "explain": {"weights": "weights.pt", "layer": EXPLAIN_LAYER, "head": "fc"}},
        state=model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO_CLASSIFIER)
    parser.add_argument("--eval-scenes", type=int, default=200,
                        help="held-out scenes to measure accuracy on (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    train(args.steps, args.out, args.seed)
    log.info("trained in %.0f s -> %s", time.perf_counter() - t0, args.out)
    if args.eval_scenes:
        result = evaluate(load_demo_classifier(args.out), args.eval_scenes)
        print(f"held out ({args.eval_scenes} scenes from seed {HELD_OUT_SEED}): accuracy "
              f"{result['accuracy']:.3f}, CAM pointing game {result['pointing_game']:.3f}")


if __name__ == "__main__":
    main()
