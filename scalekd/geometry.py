"""The cross-resolution geometry ScaleKD rests on, in one place: what each model sees and how their maps line up.

The student sees an image at short side ``s`` (padded to a multiple of 32); the teacher sees the same image at
exactly ``teacher_scale`` x the student's resized shape (padded to ``teacher_scale`` x 32), so its canvas is exactly
2x the student's and every teacher grid is a student grid or twice one. With the teacher at 2x, its P_{l+1} sees the
student's P_l objects at the same size in feature cells, on the same grid, and (the anchor sizes being multiples of
the stride) on exactly the student's anchors: "scale_aligned" pairing (MSAD, CVPR 2021; CMHRD, TGRS 2024), a
departure from the paper, whose teacher P_l is 2x finer than the student's P_l ("same_level", the paper's).
The tests that guard it: tests/test_geometry.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator

if TYPE_CHECKING:
    from scalekd.config import Config


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
    # One-stage only: the finest FPN level. 3 is torchvision's P3-P7; 2 runs P2-P6 (stride 4 to 64), which a
    # low-resolution student needs to place anchors on objects of 4-12 px (MSAD runs its student on P2-P6).
    min_level: int = 3
    # The images are padded to a multiple of this. The teacher at 2x pads to 2 x 32, so that its padded
    # canvas is exactly twice the student's and every teacher grid is exactly a student grid (or twice one).
    size_divisible: int = 32
    # RetinaNet's matcher: positive at IoU >= positive_iou, background below negative_iou (torchvision's 0.5 / 0.4).
    positive_iou: float = 0.5
    negative_iou: float = 0.4

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def problems(self) -> list[str]:
        """What in a spec read from a model file no detector of ours has: unknown names, sizes or widths out of
        range, non-numbers. Checked before anything is built, so an altered file cannot make us allocate a
        model of any size it likes."""
        from scalekd.config import BACKBONES, DETECTORS, MAX_FPN_CHANNELS

        def whole(v, lo: int, hi: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        def number(v, lo: float, hi: float) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi

        checks = {"detector": self.detector in DETECTORS, "backbone": self.backbone in BACKBONES,
                  "num_classes": whole(self.num_classes, 1, 100_000),
                  "fpn_channels": whole(self.fpn_channels, 8, MAX_FPN_CHANNELS),
                  "min_size": whole(self.min_size, 32, 16_384),
                  "max_size": whole(self.max_size, 32, 32_768) and self.max_size >= self.min_size,
                  "anchor_scale": number(self.anchor_scale, 1e-3, 64), "min_level": self.min_level in (2, 3),
                  "size_divisible": whole(self.size_divisible, 32, 256),
                  "positive_iou": number(self.positive_iou, 0, 1),
                  "negative_iou": number(self.negative_iou, 0, 1) and self.negative_iou <= self.positive_iou}
        return [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]

    @property
    def strides(self) -> tuple[int, ...]:
        """The FPN levels' strides in this detector's own input pixels, finest first."""
        first = self.min_level if self.detector in ("retinanet", "fcos") else 2
        return tuple(2**level for level in range(first, first + 5))


def student_spec(cfg: Config, num_classes: int) -> DetectorSpec:
    size = cfg.data.student_size
    min_level = cfg.model.student_min_level if cfg.one_stage else 3
    return DetectorSpec(cfg.model.detector, cfg.model.student_backbone, num_classes, cfg.model.fpn_channels,
                        size, int(round(size * cfg.data.max_size_ratio)), cfg.model.anchor_scale, min_level,
                        positive_iou=cfg.experimental.positive_iou, negative_iou=cfg.experimental.negative_iou)


def teacher_spec(cfg: Config, num_classes: int) -> DetectorSpec:
    """At teacher_scale x the student's size, max size and padding, so both views' grids line up exactly."""
    scale = cfg.data.teacher_scale
    max_size = int(round(int(round(cfg.data.student_size * cfg.data.max_size_ratio)) * scale))
    return DetectorSpec(cfg.model.detector, cfg.model.teacher_backbone, num_classes, cfg.model.fpn_channels,
                        cfg.teacher_size, max_size, cfg.model.anchor_scale, 3, cfg.teacher_size_divisible,
                        positive_iou=cfg.experimental.positive_iou, negative_iou=cfg.experimental.negative_iou)


def anchor_generator(spec: DetectorSpec) -> AnchorGenerator:
    """The detector's anchors (RetinaNet boxes, FCOS points, the RPN's boxes), also what ``data stats``
    measures coverage with. Sizes are stride multiples, so the 2x teacher's P_{l+1} anchors are the student's P_l
    anchors scaled by 2."""
    if spec.detector == "retinanet":
        sizes = tuple(tuple(spec.anchor_scale * s * 2 ** (k / 3) for k in range(3)) for s in spec.strides)
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    if spec.detector == "fcos":
        # FCOS's anchors are points; its size ranges per level are multiples of the stride.
        return AnchorGenerator(tuple((float(s),) for s in spec.strides), ((1.0,),) * len(spec.strides))
    if spec.detector == "faster_rcnn":
        sizes = tuple((spec.anchor_scale * 2 * s,) for s in spec.strides)
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    raise ValueError(f"unknown detector {spec.detector!r}")


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """The student's view: short side ``short_side``, long side at most ``max_size``."""
    scale = min(short_side / min(height, width), max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def teacher_shape(student_height: int, student_width: int, teacher_scale: float) -> tuple[int, int]:
    """The teacher's view: exactly ``teacher_scale`` x the student's shape (not resized from the source on its own
    rule), so feature maps line up across the models."""
    return int(round(student_height * teacher_scale)), int(round(student_width * teacher_scale))


def pair_teacher_maps(teacher_maps: list[Tensor], student_levels: int, student_min_level: int,
                      teacher_min_level: int, pairing: str) -> list[Tensor]:
    """The teacher map for each student level, finest first.

    ``scale_aligned``: student P_l gets teacher P_{l+1}; past the teacher's coarsest level the next one is made
    by max-pooling (kernel 1, stride 2: torchvision's LastLevelMaxPool). ``same_level``: P_l gets P_l.
    """
    offset = student_min_level - teacher_min_level + (1 if pairing == "scale_aligned" else 0)
    if offset < 0:
        raise ValueError(f"{pairing} pairing: the student's P{student_min_level} has no teacher level (the "
                         f"teacher's finest is P{teacher_min_level}); use scale_aligned")
    maps = list(teacher_maps)
    while len(maps) < offset + student_levels:
        maps.append(F.max_pool2d(maps[-1], 1, 2))
    return maps[offset: offset + student_levels]


def resize_like(source: Tensor, like: Tensor) -> Tensor:
    """``source`` on ``like``'s grid: area-pooled when finer, nearest-upsampled when coarser, as is if equal."""
    if source.shape[-2:] == like.shape[-2:]:
        return source
    if source.shape[-2] >= like.shape[-2]:
        return F.adaptive_avg_pool2d(source, (like.shape[-2], like.shape[-1]))
    return F.interpolate(source, size=like.shape[-2:], mode="nearest")
