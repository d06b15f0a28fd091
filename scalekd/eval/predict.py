"""Run a detector over a dataset and return COCO-format detections in original-image coordinates."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from scalekd.data.coco import CocoDetection
from scalekd.data.transforms import DualResolutionCollate

if TYPE_CHECKING:
    from scalekd.models.detectors import Detector


def configure_for_eval(model: Detector, score_threshold: float, max_detections: int) -> None:
    if hasattr(model, "roi_heads"):
        model.roi_heads.score_thresh = score_threshold
        model.roi_heads.detections_per_img = max_detections
    else:
        model.score_thresh = score_threshold
        model.detections_per_img = max_detections


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, input_size: int, max_size_ratio: float,
            batch_size: int = 4, score_threshold: float = 0.05, max_detections: int = 100,
            device: torch.device | str = "cpu") -> list[dict]:
    """Detections as COCO results: ``{image_id, category_id, bbox [x, y, w, h], score}``.

    A model with a ``teacher_scale`` attribute (``AssistedDetector``) is called with both views the training
    collate makes, ``model(student_images, teacher_images)``, and answers in the student view's pixels."""
    configure_for_eval(model, score_threshold, max_detections)
    model.eval().to(device)
    teacher_scale = getattr(model, "teacher_scale", None)
    collate = DualResolutionCollate(input_size, teacher_scale or 1.0, max_size_ratio, hflip_prob=0.0,
                                    with_teacher=teacher_scale is not None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    results = []
    for batch in loader:
        views = [[im.to(device) for im in batch.student_images]]
        if teacher_scale is not None:
            views.append([im.to(device) for im in batch.teacher_images])
        outputs = model(*views)
        for out, target in zip(outputs, batch.student_targets):
            sy, sx = target["scale"]
            boxes = out["boxes"].cpu() / torch.tensor([sx, sy, sx, sy])
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                if not 1 <= label <= len(dataset.category_ids):
                    continue
                x0, y0, x1, y1 = box
                results.append({"image_id": target["image_id"], "category_id": dataset.category_ids[label - 1],
                                "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                                "score": round(float(score), 5)})
    return results


@torch.no_grad()
def images_per_second(model: nn.Module, dataset: CocoDetection, input_size: int, max_size_ratio: float,
                      device: torch.device | str = "cpu", images: int = 20, warmup: int = 3) -> float:
    """Measured inference throughput at batch 1 on ``device`` (a measurement, not an estimate)."""
    model.eval().to(device)
    collate = DualResolutionCollate(input_size, 1.0, max_size_ratio, with_teacher=False)
    samples = [collate([dataset[i % len(dataset)]]).student_images[0].to(device)
               for i in range(min(images, len(dataset)) + warmup)]
    for image in samples[:warmup]:
        model([image])
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for image in samples[warmup:]:
        model([image])
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return (len(samples) - warmup) / (time.perf_counter() - start)
