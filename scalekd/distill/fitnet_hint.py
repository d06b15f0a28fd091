"""FitNet's hint (Romero et al., 2015): the adapter and its L2 to the teacher's maps (``methods/fitnet.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FitNetHint(nn.Module):
    """A 1x1 conv adapter per FPN level (shared), L2 to the teacher's maps pooled to the student's grid."""

    def __init__(self, channels: int):
        super().__init__()
        self.adapter = nn.Conv2d(channels, channels, 1)

    def forward(self, student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
        losses = []
        for s, t in zip(student_maps, teacher_maps):
            t = F.adaptive_avg_pool2d(t, (s.shape[-2], s.shape[-1])) if t.shape[-2:] != s.shape[-2:] else t
            losses.append(F.mse_loss(self.adapter(s), t))
        total = losses[0]
        for loss in losses[1:]:  # summed in order, as sum() would
            total = total + loss
        return total / len(losses)
