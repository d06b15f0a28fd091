"""Detector builders over torchvision: RetinaNet, FCOS and Faster R-CNN with FPN over ResNet or
MobileNetV2, randomly initialised (nothing is downloaded), sized per role (teacher at 2x)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from scalekd.geometry import DetectorSpec, anchor_generator

# A torchvision RetinaNet, FCOS or FasterRCNN. Any: we reach into its submodules (transform, backbone.body, head,
# roi_heads), which nn.Module's attribute lookup types as Tensor | Module.
Detector = Any

# End of each stride stage in mobilenet_v2().features: stride 4, 8, 16, 32 (with the 1280-ch conv).
_MOBILENET_V2_STAGES = {"4": (3, 24), "8": (6, 32), "16": (13, 96), "32": (18, 1280)}


class LastLevelP6(ExtraFPNBlock):
    """P6 from P5 by a stride-2 3x3 conv: the one extra level a P2-P6 one-stage pyramid needs."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        nn.init.kaiming_uniform_(self.p6.weight, a=1)
        nn.init.constant_(self.p6.bias, 0.0)  # type: ignore[arg-type]  # a Conv2d made with bias

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor],
                names: list[str]) -> tuple[list[torch.Tensor], list[str]]:
        # Typed and written without star-unpacking: TorchScript export (scalekd export) compiles this.
        return results + [self.p6(results[-1])], names + ["p6"]


def _backbone(name: str, detector: str, fpn_channels: int, min_level: int = 3) -> BackboneWithFPN:
    one_stage = detector in ("retinanet", "fcos")
    from_p2 = not one_stage or min_level == 2
    if not one_stage:
        extra: ExtraFPNBlock = LastLevelMaxPool()
    elif min_level == 2:
        extra = LastLevelP6(fpn_channels)
    else:
        extra = LastLevelP6P7(fpn_channels, fpn_channels)
    if name.startswith("resnet"):
        body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
        layers = [1, 2, 3, 4] if from_p2 else [2, 3, 4]
        width = body.inplanes // 8  # channels of layer1's output (64 basic, 256 bottleneck)
        in_channels = [width * 2 ** (i - 1) for i in layers]
        return_layers = {f"layer{k}": str(i) for i, k in enumerate(layers)}
        return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    if name == "mobilenet_v2":
        strides = ["4", "8", "16", "32"] if from_p2 else ["8", "16", "32"]
        features = mobilenet_v2(weights=None).features
        return_layers = {str(_MOBILENET_V2_STAGES[s][0]): str(i) for i, s in enumerate(strides)}
        in_channels = [_MOBILENET_V2_STAGES[s][1] for s in strides]
        return BackboneWithFPN(features, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    raise ValueError(f"unknown backbone {name!r}")


def build_detector(spec: DetectorSpec) -> Detector:
    """A torchvision detector; its ``forward(images, targets=None)`` contract is unchanged."""
    model = _build(spec)
    model.transform.size_divisible = spec.size_divisible
    return model


def _build(spec: DetectorSpec) -> Detector:
    backbone = _backbone(spec.backbone, spec.detector, spec.fpn_channels, spec.min_level)
    common = dict(min_size=spec.min_size, max_size=spec.max_size)
    anchors = anchor_generator(spec)
    if spec.detector == "retinanet":
        return RetinaNet(backbone, spec.num_classes + 1, anchor_generator=anchors, fg_iou_thresh=spec.positive_iou,
                         bg_iou_thresh=spec.negative_iou, **common)
    if spec.detector == "fcos":
        return _with_single_value_group_norm(FCOS(backbone, spec.num_classes + 1, anchor_generator=anchors, **common))
    if spec.detector == "faster_rcnn":
        representation = min(1024, spec.fpn_channels * 4)
        box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, representation)
        predictor = FastRCNNPredictor(representation, spec.num_classes + 1)
        return FasterRCNN(backbone, rpn_anchor_generator=anchors, box_head=box_head, box_predictor=predictor,
                          **common)
    raise ValueError(f"unknown detector {spec.detector!r}")


class SingleValueGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also normalises a group holding one value (to its bias, what the formula gives), where
    ``F.group_norm`` raises "Expected more than 1 value per channel". FCOS's head uses GroupNorm(32, channels): at
    ``fpn_channels`` 32 each group is one channel, so a 1x1 pyramid level at batch 1 (a 64 px student's P6/P7 at
    export or single-image inference) has one value per group. Same parameters and outputs wherever torch accepts
    the input; the ONNX export traces the same ``aten::group_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def _with_single_value_group_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = SingleValueGroupNorm
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_parameters(model: Detector) -> list[nn.Parameter]:
    """The backbone body (not the FPN): what student warm-up freezes."""
    return list(model.backbone.body.parameters())


def last_stage_features(model: Detector, images: torch.Tensor) -> tuple[torch.Tensor, OrderedDict]:
    """(C5 [N, C, H/32, W/32], FPN maps) of a batched, normalised image tensor."""
    body = model.backbone.body(images)
    c5 = list(body.values())[-1]
    return c5, model.backbone.fpn(body)
