"""Dual-resolution batches: each sample is loaded once, then resized for the student (short side s)
and for the teacher (short side teacher_scale x s), with targets scaled by the same factors.

The detectors' own transforms are built with the same min/max sizes, so they do not resize again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from scalekd.geometry import resized_shape, teacher_shape


def resize_sample(image: torch.Tensor, target: dict, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Resize ``image`` [3, H, W] to ``size`` (h, w) and scale its boxes by the same factors."""
    h, w = image.shape[1:]
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    sy, sx = size[0] / h, size[1] / w
    scale = torch.tensor([sx, sy, sx, sy])
    new_target = dict(target)
    for key in ("boxes", "ignore_boxes"):
        if key in target:
            new_target[key] = target[key] * scale
    new_target["scale"] = (sy, sx)
    return out, new_target


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[2]
    new_target = dict(target)
    for key in ("boxes", "ignore_boxes"):
        if key in target and target[key].numel():
            b = target[key].clone()
            b[:, [0, 2]] = width - target[key][:, [2, 0]]
            new_target[key] = b
    return image.flip(-1), new_target


@dataclass
class DualBatch:
    """One batch at two resolutions; targets for the teacher are the student's scaled by its factor."""

    student_images: list[torch.Tensor]
    student_targets: list[dict]
    teacher_images: list[torch.Tensor]
    teacher_targets: list[dict]

    def to(self, device: torch.device) -> DualBatch:
        def move(targets):
            return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]

        return DualBatch([im.to(device, non_blocking=True) for im in self.student_images],
                         move(self.student_targets),
                         [im.to(device, non_blocking=True) for im in self.teacher_images],
                         move(self.teacher_targets))


class DualResolutionCollate:
    """Collate function: random flip (train), then resize to the student's and teacher's sizes.

    Flips draw from the collate's own generator once ``reseed`` has been called (the training loop does, per
    epoch), else from torch's global stream. In a DataLoader worker they always draw from the worker's stream,
    which DataLoader seeds from its own generator: a copy of this generator in every worker would flip every
    worker's batches alike."""

    def __init__(self, student_size: int, teacher_scale: float, max_size_ratio: float,
                 hflip_prob: float = 0.0, with_teacher: bool = True):
        self.student_size = student_size
        self.teacher_scale = teacher_scale
        self.max_size = int(round(student_size * max_size_ratio))
        self.hflip_prob = hflip_prob
        self.with_teacher = with_teacher
        self._generator: torch.Generator | None = None

    def reseed(self, seed: int) -> None:
        """Flips from now on come from a generator seeded with ``seed`` alone, whatever else drew from torch's
        global stream (module initialisation, other variants' extra modules)."""
        self._generator = torch.Generator().manual_seed(seed)

    def _flip(self) -> bool:
        generator = self._generator if get_worker_info() is None else None
        return self.hflip_prob > 0 and float(torch.rand((), generator=generator)) < self.hflip_prob

    def __call__(self, samples: list[tuple[torch.Tensor, dict]]) -> DualBatch:
        s_imgs, s_tgts, t_imgs, t_tgts = [], [], [], []
        for image, target in samples:
            if self._flip():
                image, target = hflip(image, target)
            sh, sw = resized_shape(image.shape[1], image.shape[2], self.student_size, self.max_size)
            s_img, s_tgt = resize_sample(image, target, (sh, sw))
            s_imgs.append(s_img)
            s_tgts.append(s_tgt)
            if self.with_teacher:
                th, tw = teacher_shape(sh, sw, self.teacher_scale)
                t_img, t_tgt = resize_sample(image, target, (th, tw))
                t_imgs.append(t_img)
                t_tgts.append(t_tgt)
        return DualBatch(s_imgs, s_tgts, t_imgs, t_tgts)
