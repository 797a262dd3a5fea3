"""The attribution methods of /explain (worker/explain_methods.py), held to pytorch-grad-cam
(grad-cam 1.5.7) and to gradients computed here with plain autograd.

Each batch mixes a given target with a top-1 one (None), and every item of our batched result
must equal the reference run on that item alone, so batching is covered too. Models: a
torchvision resnet18 with random weights and calibrated BatchNorm (layer4, layer3), and a
small GAP + linear CNN (features.stage4), likewise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cvserve.models.classifiers import normalize_imagenet
from cvserve.models.export import calibrate_batchnorm, scene_batch
from cvserve.models.synthetic import make_scene
from cvserve.worker.explain_methods import (
    Explainer,
    cam,
    capture,
    gradcam,
    guided_backprop,
    guided_copy,
    module_at,
    saliency,
    scale,
    upsample,
)

MIN_CORRELATION = 0.99  # Pearson, per item, ours vs the reference
MAP_ATOL = 1e-4  # the [0, 1] maps agree to float32 rounding (1e-6 seen), not just in shape
RESNET_SIZE = (128, 96)  # width, height: not square, so a swapped H / W shows
RESNET_TARGETS: list[int | None] = [7, None]  # 7 is no item's top-1; None asks for the top-1
OTHER_TARGET = 500  # a class the resnet18 is not asked about (the negative controls')
SMALL_TARGETS: list[int | None] = [2, None]  # a given class, top-1
SMALL_SIZE = 128


@dataclass
class Case:
    """A model, a batch and its targets, and pytorch-grad-cam's outputs for each item alone
    (computed once per module: the reference is the slow half)."""

    net: nn.Module
    images: torch.Tensor  # [B, 3, H, W], normalized
    targets: list[int | None]
    head: str  # the nn.Linear on the pooled features
    layer: str  # the feature map it pools
    _cams: dict[tuple[str, str, int, int | None], np.ndarray] = field(default_factory=dict)
    _guided: dict[tuple[int, int | None], np.ndarray] = field(default_factory=dict)

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def image(self, item: int) -> torch.Tensor:
        """One item as a batch of its own, a leaf that requires grad. The parameters are
        frozen (no reference needs their gradients, which would double its backward), so
        the input's flag is what puts the layer on the graph for the reference's hooks."""
        return self.images[item:item + 1].clone().requires_grad_(True)

    def reference_cam(self, method: str, layer: str, item: int,
                      target: int | None = None) -> np.ndarray:
        """GradCAM / GradCAMPlusPlus of one image alone. # -> [H, W] in [0, 1], input pixels"""
        target = self.targets[item] if target is None else target
        key = (method, layer, item, target)
        if key not in self._cams:
            kind = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
            targets = None if target is None else [ClassifierOutputTarget(target)]
            with kind(self.net, [module_at(self.net, layer)]) as explainer:
                self._cams[key] = explainer(self.image(item), targets)[0]
        return self._cams[key]

    def reference_guided(self, item: int, target: int | None = None) -> np.ndarray:
        """GuidedBackpropReLUModel's input gradient of one image alone. # -> [H, W, 3]"""
        target = self.targets[item] if target is None else target
        key = (item, target)
        if key not in self._guided:
            # A copy: the reference swaps the model's ReLUs and puts back new ones.
            model = GuidedBackpropReLUModel(copy.deepcopy(self.net), "cpu")
            self._guided[key] = model(self.image(item), target_category=target)
        return self._guided[key]


def scenes(seeds: range, width: int, height: int) -> torch.Tensor:
    """Generated scenes. # -> [len(seeds), 3, height, width] float in [0, 1]"""
    return torch.stack([torch.from_numpy(np.array(make_scene(s, width, height).image))
                        .permute(2, 0, 1) for s in seeds]).float() / 255


def pearson(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.corrcoef(np.ravel(np.asarray(a)), np.ravel(np.asarray(b)))[0, 1])


def at_input(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Our layer-resolution maps as the reference returns them: bilinear (cv2's INTER_LINEAR)
    to the input size, then min-max scaled again (its aggregate_multi_layers does)."""
    return scale(upsample(maps, hw))


@pytest.fixture(scope="module")
def resnet18_case() -> Case:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    calibrate_batchnorm(net, normalize_imagenet(scene_batch(0, n=8, size=224)))
    images = normalize_imagenet(scenes(range(11, 13), *RESNET_SIZE))
    return Case(net.eval().requires_grad_(False), images, RESNET_TARGETS, head="fc",
                layer="layer4")


class SmallGapCnn(nn.Module):
    """Four stride-2 stages of 3x3 conv + BatchNorm + ReLU, global average pooling and one
    linear layer: a second architecture, with named nested stages."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential()
        for name, (cin, cout) in zip(("stage1", "stage2", "stage3", "stage4"),
                                     ((3, 24), (24, 48), (48, 96), (96, 128)), strict=True):
            self.features.add_module(name, stage(cin, cout))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def small_case() -> Case:
    torch.manual_seed(1)
    net = SmallGapCnn()
    calibrate_batchnorm(net, normalize_imagenet(scene_batch(5, n=8, size=SMALL_SIZE)))
    images = normalize_imagenet(scenes(range(21, 23), SMALL_SIZE, SMALL_SIZE))
    return Case(net.eval().requires_grad_(False), images, SMALL_TARGETS, head="fc",
                layer="features.stage4")


@pytest.fixture
def case(request: pytest.FixtureRequest, model: str) -> Case:
    return request.getfixturevalue(f"{model}_case")


LAYERS = pytest.mark.parametrize("model, layer", [
    ("resnet18", "layer4"), ("resnet18", "layer3"), ("small", "features.stage4")])
LAST_LAYERS = pytest.mark.parametrize("model, layer", [
    ("resnet18", "layer4"), ("small", "features.stage4")])
MODELS = pytest.mark.parametrize("model", ["resnet18", "small"])


@LAYERS
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_batched_gradcam_equals_reference_per_item(case: Case, layer: str, method: str) -> None:
    maps, logits, chosen = gradcam(case.net, case.images, case.targets, layer,
                                   plus=method == "gradcam++")
    assert maps.shape[0] == len(case.images) and maps.shape[1:] != case.hw  # layer resolution
    ours = at_input(maps, case.hw)
    for i, target in enumerate(case.targets):
        ref = case.reference_cam(method, layer, i)
        assert int(chosen[i]) == (int(logits[i].argmax()) if target is None else target)
        assert pearson(ours[i], ref) >= MIN_CORRELATION
        torch.testing.assert_close(ours[i], torch.from_numpy(ref), atol=MAP_ATOL, rtol=0)


@LAST_LAYERS
def test_cam_equals_gradcam_on_gap_linear_head(case: Case, layer: str) -> None:
    # logits = fc(mean over H, W of the layer): Grad-CAM's channel weights are the target's
    # fc row over h * w, so the two maps agree up to a positive scale, which scale removes.
    with torch.no_grad(), capture(module_at(case.net, layer)) as seen:
        logits = case.net(case.images)
    chosen = torch.tensor([int(logits[i].argmax()) if t is None else t
                           for i, t in enumerate(case.targets)])
    head = module_at(case.net, case.head)
    ours = at_input(cam(seen[0], head.weight.detach(), chosen), case.hw)
    for i in range(len(case.images)):
        ref = case.reference_cam("gradcam", layer, i)
        assert pearson(ours[i], ref) >= MIN_CORRELATION
        torch.testing.assert_close(ours[i], torch.from_numpy(ref), atol=MAP_ATOL, rtol=0)


@MODELS
def test_saliency_is_the_channel_max_of_the_input_gradient(case: Case) -> None:
    maps, _, chosen = saliency(case.net, case.images, case.targets)
    assert maps.shape == (len(case.images), *case.hw)
    for i in range(len(case.images)):
        x = case.images[i:i + 1].clone().requires_grad_(True)
        net_logits = case.net(x)
        grad, = torch.autograd.grad(net_logits[0, int(chosen[i])], x)
        expected = grad[0].abs().amax(dim=0)
        expected = expected - expected.min()
        expected = expected / (expected.max() + 1e-7)
        torch.testing.assert_close(maps[i], expected, atol=1e-5, rtol=0)


@MODELS
def test_guided_backprop_equals_reference_per_item(case: Case) -> None:
    grads, _, _ = guided_backprop(guided_copy(case.net), case.images, case.targets)
    assert grads.shape == case.images.shape
    explainer = Explainer(copy.deepcopy(case.net), "cpu", head=case.head, layer=case.layer)
    maps, _, _ = explainer.run("guided-backprop", case.images, case.targets, case.layer)
    for i in range(len(case.images)):
        ref = torch.from_numpy(case.reference_guided(i)).permute(2, 0, 1)  # [3, H, W]
        assert pearson(grads[i], ref) >= MIN_CORRELATION
        torch.testing.assert_close(grads[i], ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
        assert pearson(maps[i], ref.abs().amax(dim=0)) >= MIN_CORRELATION


@LAST_LAYERS
def test_guided_gradcam_is_gradcam_times_guided_backprop(case: Case, layer: str) -> None:
    # Selvaraju et al.: the Grad-CAM map at input resolution times the guided backprop
    # gradient, shown as |.| maximum over colour channels.
    explainer = Explainer(copy.deepcopy(case.net), "cpu", head=case.head, layer=layer)
    maps, _, _ = explainer.run("guided-gradcam", case.images, case.targets, layer)
    assert maps.shape == (len(case.images), *case.hw)
    for i in range(len(case.images)):
        product = case.reference_cam("gradcam", layer, i)[..., None] * case.reference_guided(i)
        expected = scale(torch.from_numpy(np.abs(product).max(axis=2))[None])[0]
        assert pearson(maps[i], expected) >= MIN_CORRELATION


def test_references_for_another_target_do_not_pass(resnet18_case: Case) -> None:
    """The negative control: the same comparisons, against the reference for a class the item
    was not explained for, fall well below the thresholds the tests above hold to."""
    case = resnet18_case
    maps, _, _ = gradcam(case.net, case.images, case.targets, "layer4")
    ours = at_input(maps, case.hw)[0]
    assert pearson(ours, case.reference_cam("gradcam", "layer4", 0)) >= MIN_CORRELATION
    assert pearson(ours, case.reference_cam("gradcam", "layer4", 0, OTHER_TARGET)) < 0.9
    # Guided backprop hardly depends on the class (Adebayo et al. 2018, "Sanity Checks for
    # Saliency Maps"): another target's gradient still correlates > 0.99 with this one's,
    # so it is the tolerance on the values (1e-4 of the maximum) that tells them apart.
    grads, _, _ = guided_backprop(guided_copy(case.net), case.images[:1], case.targets[:1])
    other = torch.from_numpy(case.reference_guided(0, OTHER_TARGET)).permute(2, 0, 1)
    assert float((grads[0] - other).abs().max()) > 1e-2 * float(other.abs().max())
    sal, _, _ = saliency(case.net, case.images[[0, 0]], [case.targets[0], OTHER_TARGET])
    assert float((sal[0] - sal[1]).abs().max()) > 0.1


def test_module_at_names_top_level_layers_for_a_bad_path(resnet18_case: Case) -> None:
    net = resnet18_case.net
    assert module_at(net, "layer4.1.conv2") is net.layer4[1].conv2
    for bad in ("layer5", "layer4.9", ""):
        with pytest.raises(KeyError, match="conv1, bn1, relu, maxpool, layer1, .*, fc"):
            module_at(net, bad)
    with pytest.raises(KeyError, match="layer5"):
        Explainer(copy.deepcopy(net), "cpu", head="fc", layer="layer5")
    with pytest.raises(TypeError, match="'layer4' is a Sequential, not nn.Linear"):
        Explainer(copy.deepcopy(net), "cpu", head="layer4", layer="layer4")


def test_explainer_run_leaves_no_hooks_behind(resnet18_case: Case) -> None:
    case = resnet18_case
    explainer = Explainer(copy.deepcopy(case.net), "cpu", head="fc", layer="layer4")
    x = normalize_imagenet(scenes(range(1), 64, 64))  # small: only the hooks matter here

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for net in (explainer.net, explainer.guided) for m in net.modules())

    for method in ("gradcam", "gradcam++", "saliency", "guided-backprop", "guided-gradcam"):
        explainer.run(method, x, [None], "layer3")
        assert hooks() == 0, method
    with pytest.raises(RuntimeError):  # a target past the last class fails inside the hook
        explainer.run("gradcam", x, [1000], "layer4")
    assert hooks() == 0
    with pytest.raises(ValueError, match="not a gradient method: occlusion"):
        explainer.run("occlusion", x, [None], "layer4")
