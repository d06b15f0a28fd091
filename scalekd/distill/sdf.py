"""Scale-Decoupled Feature distillation (ScaleKD, section 3.1).

An adapter maps the student's last backbone stage to the teacher's width; one bottleneck residual
block (1x1 reduce, 3x3 dilated, 1x1 expand, skip) is applied with dilations 1, 2 and 3 using ONE set of
weights (TridentNet's pattern: the same conv weight called with a different dilation and padding);
each branch has its own MLP; the branches are concatenated and compared with one L2 loss.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DilatedBottleneck(nn.Module):
    """A ResNet bottleneck whose 3x3 conv takes its dilation at call time."""

    def __init__(self, channels: int, ratio: int = 4):
        super().__init__()
        mid = max(8, channels // ratio)
        self.reduce = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.conv3x3 = nn.Conv2d(mid, mid, 3, bias=False)
        self.bn3x3 = nn.BatchNorm2d(mid)
        self.expand = nn.Sequential(nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor, dilation: int, reduced: Tensor | None = None) -> Tensor:
        """[N, C, H, W] -> [N, C, H, W]. ``reduced``: ``self.reduce(x)`` when the caller already has it (the
        shared block runs the same 1x1 on the same input for every dilation)."""
        y = self.reduce(x) if reduced is None else reduced
        y = F.conv2d(y, self.conv3x3.weight, padding=dilation, dilation=dilation)
        y = F.relu(self.bn3x3(y), inplace=True)
        return F.relu(x + self.expand(y), inplace=True)


class ScaleDecoupledFeatures(nn.Module):
    """forward(student_c5 [N, Cs, h, w], teacher_c5 [N, Ct, H, W]) -> two [N, B*E, h, w] embeddings."""

    def __init__(self, student_channels: int, teacher_channels: int, embed_channels: int = 128,
                 dilations: tuple[int, ...] = (1, 2, 3), weight_sharing: bool = True, ratio: int = 4,
                 teacher_mode: str = "shared"):
        super().__init__()
        self.dilations = tuple(dilations)
        self.weight_sharing = weight_sharing
        self.teacher_mode = teacher_mode
        self.adapter = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                     nn.BatchNorm2d(teacher_channels), nn.ReLU(inplace=True))
        n_blocks = 1 if weight_sharing else len(self.dilations)
        self.blocks = nn.ModuleList(DilatedBottleneck(teacher_channels, ratio) for _ in range(n_blocks))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Conv2d(teacher_channels, embed_channels, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(embed_channels, embed_channels, 1))
            for _ in self.dilations)
        self.teacher_branch: nn.ModuleDict | None = None
        if teacher_mode == "frozen":
            # Interpretation: the teacher side is a frozen copy of the initial block and MLPs
            # (saved with the module so a resumed run compares against the same projection).
            self.teacher_branch = nn.ModuleDict({"blocks": copy.deepcopy(self.blocks),
                                                 "mlps": copy.deepcopy(self.mlps)})
            self.teacher_branch.requires_grad_(False)

    def embed(self, x: Tensor, blocks: Any, mlps: Any) -> Tensor:
        """``blocks`` and ``mlps``: ModuleLists of the bottleneck blocks and the per-branch MLPs."""
        branches = []
        reduced = blocks[0].reduce(x) if self.weight_sharing else None  # one 1x1 reduce for every dilation
        for i, dilation in enumerate(self.dilations):
            block = blocks[0] if self.weight_sharing else blocks[i]
            branches.append(mlps[i](block(x, dilation, reduced)))
        return torch.cat(branches, dim=1)

    def forward(self, student_c5: Tensor, teacher_c5: Tensor) -> tuple[Tensor, Tensor]:
        student = self.embed(self.adapter(student_c5), self.blocks, self.mlps)
        with torch.no_grad():
            if self.teacher_branch is not None:  # teacher_mode "frozen"
                self.teacher_branch.eval()
                teacher = self.embed(teacher_c5, self.teacher_branch.blocks, self.teacher_branch.mlps)
            else:  # shared: gradient reaches the module only through the student side
                teacher = self.embed(teacher_c5, self.blocks, self.mlps)
            # The teacher ran at its own (2x) resolution: area-pool it onto the student's grid.
            teacher = F.adaptive_avg_pool2d(teacher, (student.shape[-2], student.shape[-1]))
        return student, teacher
