"""Which teacher FPN map each student FPN map learns from, on which grid.

With the teacher at 2x, its P_{l+1} sees the student's P_l objects at the same size in feature cells, on the
same grid, and (the anchor sizes being stride multiples) on exactly the student's anchors: "scale_aligned"
pairing (MSAD, CVPR 2021; CMHRD, TGRS 2024), a departure from the paper, whose teacher P_l is 2x finer than
the student's P_l ("same_level", the paper's). Exact grids need the teacher's canvas to be exactly 2x the
student's: the teacher pads to 64 where the student pads to 32 (``Config.teacher_size_divisible``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
        return F.adaptive_avg_pool2d(source, like.shape[-2:])
    return F.interpolate(source, size=like.shape[-2:], mode="nearest")
