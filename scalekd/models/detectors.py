"""Detector builders over torchvision: RetinaNet, FCOS and Faster R-CNN with FPN over ResNet or
MobileNetV2, randomly initialised (nothing is downloaded), sized per role (teacher at 2x)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

# End of each stride stage in mobilenet_v2().features: stride 4, 8, 16, 32 (with the 1280-ch conv).
_MOBILENET_V2_STAGES = {"4": (3, 24), "8": (6, 32), "16": (13, 96), "32": (18, 1280)}


@dataclass(frozen=True)
class DetectorSpec:
    """What it takes to rebuild a detector: stored in every checkpoint beside its weights."""

    detector: str
    backbone: str
    num_classes: int  # object classes, background excluded
    fpn_channels: int
    min_size: int
    max_size: int
    anchor_scale: float = 4.0  # anchor side / feature stride on each level (torchvision uses 4)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _backbone(name: str, detector: str, fpn_channels: int) -> BackboneWithFPN:
    one_stage = detector in ("retinanet", "fcos")
    extra = LastLevelP6P7(fpn_channels, fpn_channels) if one_stage else LastLevelMaxPool()
    if name.startswith("resnet"):
        body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
        layers = [2, 3, 4] if one_stage else [1, 2, 3, 4]
        width = body.inplanes // 8  # channels of layer1's output (64 basic, 256 bottleneck)
        in_channels = [width * 2 ** (i - 1) for i in layers]
        return_layers = {f"layer{k}": str(i) for i, k in enumerate(layers)}
        return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    if name == "mobilenet_v2":
        strides = ["8", "16", "32"] if one_stage else ["4", "8", "16", "32"]
        features = mobilenet_v2(weights=None).features
        return_layers = {str(_MOBILENET_V2_STAGES[s][0]): str(i) for i, s in enumerate(strides)}
        in_channels = [_MOBILENET_V2_STAGES[s][1] for s in strides]
        return BackboneWithFPN(features, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    raise ValueError(f"unknown backbone {name!r}")


def build_detector(spec: DetectorSpec) -> nn.Module:
    """A torchvision detector; its ``forward(images, targets=None)`` contract is unchanged."""
    backbone = _backbone(spec.backbone, spec.detector, spec.fpn_channels)
    common = dict(min_size=spec.min_size, max_size=spec.max_size)
    one_stage_strides = (8, 16, 32, 64, 128)
    if spec.detector == "retinanet":
        sizes = tuple(tuple(spec.anchor_scale * s * 2 ** (k / 3) for k in range(3)) for s in one_stage_strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(backbone, spec.num_classes + 1, anchor_generator=anchors, **common)
    if spec.detector == "fcos":
        # FCOS's anchors are points; its size ranges per level are multiples of the stride.
        anchors = AnchorGenerator(tuple((float(s),) for s in one_stage_strides), ((1.0,),) * 5)
        return FCOS(backbone, spec.num_classes + 1, anchor_generator=anchors, **common)
    if spec.detector == "faster_rcnn":
        strides = (4, 8, 16, 32, 64)
        sizes = tuple((spec.anchor_scale * 2 * s,) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        representation = min(1024, spec.fpn_channels * 4)
        box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, representation)
        predictor = FastRCNNPredictor(representation, spec.num_classes + 1)
        return FasterRCNN(backbone, rpn_anchor_generator=anchors, box_head=box_head, box_predictor=predictor,
                          **common)
    raise ValueError(f"unknown detector {spec.detector!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The backbone body (not the FPN): what student warm-up freezes."""
    return list(model.backbone.body.parameters())


def last_stage_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, OrderedDict]:
    """(C5 [N, C, H/32, W/32], FPN maps) of a batched, normalised image tensor."""
    body = model.backbone.body(images)
    c5 = list(body.values())[-1]
    return c5, model.backbone.fpn(body)
