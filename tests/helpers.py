"""Small builders shared by the tests."""

from __future__ import annotations

import json

import torch

from scalekd.config import Config
from scalekd.data.coco import dataset_from_root
from scalekd.data.transforms import DualResolutionCollate
from scalekd.distill.distiller import Distiller, Optimizers
from scalekd.models.detectors import build_detector
from scalekd.geometry import student_spec, teacher_spec


def build_pair(cfg: Config, num_classes: int = 4):
    torch.manual_seed(0)
    return build_detector(student_spec(cfg, num_classes)), build_detector(teacher_spec(cfg, num_classes))


def tiny_batch(cfg: Config, images: int = 2):
    ds = dataset_from_root(cfg.data.root, "train")
    collate = DualResolutionCollate(cfg.data.student_size, cfg.data.teacher_scale, cfg.data.max_size_ratio)
    return collate([ds[i] for i in range(images)])


def distiller_with_optimizers(cfg: Config, student_lr: float = 0.01, assistant_lr: float = 3e-4):
    student, teacher = build_pair(cfg)
    distiller = Distiller(student, teacher, cfg).train()
    opt = Optimizers(torch.optim.SGD(distiller.student_parameters(), lr=student_lr, momentum=0.9),
                     torch.optim.Adam(distiller.assistant_param_groups(), lr=assistant_lr)
                     if distiller.assistant_trains else None)
    return distiller, opt


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def write_coco(tmp_path, images, annotations, categories=None, name="ann.json") -> str:
    """A COCO annotation file under ``tmp_path`` (categories default to car and bus)."""
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)
