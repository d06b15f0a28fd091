"""Anchor coverage: can the detector represent the dataset's objects at all?

For each object, resized as the student (or the teacher, at teacher_scale) sees it, the best IoU of any of
the detector's anchors on the padded canvas; an object is covered when that reaches the detector's
positive threshold (RetinaNet's ``experimental.positive_iou``, 0.5 by default; the RPN 0.7). FCOS has point anchors:
an object is covered when at least one location is positive under its own assignment (centre sampling and
per-level size ranges). An object no anchor covers gets at most one low-quality positive, and its neighbours
are trained as background: no distillation can buy what this geometry forbids. Size bands are by the object's
side (sqrt of its area) in the pixels that detector sees.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
from torchvision.ops import box_iou

from scalekd.geometry import DetectorSpec, anchor_generator, resized_shape
from scalekd.models.parts import _fcos_match, atss_match

BANDS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, math.inf))
SMALL_SIDE = 32  # COCO's small class, as a side in the model's input pixels
# The coverage bar: the student's anchors must cover this share of the small objects, or most train as background.
COVERAGE_TARGET_PCT = 90.0
RPN_POSITIVE_IOU = 0.7  # torchvision's RPN matcher (Faster R-CNN)


def _band_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}px" if math.isfinite(hi) else f">={lo:g}px"


@functools.lru_cache(maxsize=32)
def image_anchors(spec: DetectorSpec, height: int, width: int) -> tuple[torch.Tensor, list[int]]:
    """Anchors of one padded image, as the detector generates them, and their cells per level. Cached: a
    dataset has few distinct image sizes."""
    div = spec.size_divisible
    ph, pw = math.ceil(height / div) * div, math.ceil(width / div) * div
    grids = []
    for stride in spec.strides:
        gh, gw = ph, pw
        for _ in range(int(math.log2(stride))):  # conv/pool stride 2 with padding: ceil at every halving
            gh, gw = math.ceil(gh / 2), math.ceil(gw / 2)
        grids.append([gh, gw])
    strides = [[torch.tensor(ph // g[0]), torch.tensor(pw // g[1])] for g in grids]
    return torch.cat(anchor_generator(spec).grid_anchors(grids, strides)), [g[0] * g[1] for g in grids]


def covered(spec: DetectorSpec, boxes: torch.Tensor, height: int, width: int,
            assigner: str = "max_iou", atss_topk: int = 9) -> torch.Tensor:
    """[K] bool: which of these boxes (xyxy, in the detector's input pixels) some anchor covers. With the ATSS
    assigner (RetinaNet), covered means at least one positive anchor, as ``DetectorParts.match`` assigns them."""
    anchors, cells_per_level = image_anchors(spec, height, width)
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    if spec.detector == "retinanet" and assigner == "atss":
        matched = atss_match(boxes, anchors, cells_per_level, atss_topk, low_quality=False)
        return torch.bincount(matched[matched >= 0], minlength=len(boxes)) > 0
    if spec.detector == "fcos":
        matched = _fcos_match(boxes, anchors, cells_per_level, 1.5)  # torchvision FCOS's center_sampling_radius
        return torch.bincount(matched[matched >= 0], minlength=len(boxes)) > 0
    threshold = spec.positive_iou if spec.detector == "retinanet" else RPN_POSITIVE_IOU
    return box_iou(boxes, anchors).max(dim=1).values >= threshold


def resized_objects(data: dict, spec: DetectorSpec) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Per image with objects: its boxes (xyxy) in the pixels ``spec``'s resize gives it, and that height and
    width. Crowd boxes and ignore regions are left out: no anchor is meant to cover them."""
    boxes_by_image: dict = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            continue
        x, y, w, h = ann["bbox"]
        if w > 0 and h > 0:
            boxes_by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    for image in data["images"]:
        if image["id"] not in boxes_by_image:
            continue
        rh, rw = resized_shape(image["height"], image["width"], spec.min_size, spec.max_size)
        scale = torch.tensor([rw / image["width"], rh / image["height"]] * 2)
        yield torch.tensor(boxes_by_image[image["id"]], dtype=torch.float32) * scale, rh, rw


def anchor_coverage(data: dict, spec: DetectorSpec, assigner: str = "max_iou",
                    atss_topk: int = 9) -> dict[str, dict]:
    """Per size band: objects and the percentage covered, for images resized as ``spec`` resizes them."""
    counts = {_band_name(*b): [0, 0] for b in BANDS}
    for boxes, rh, rw in resized_objects(data, spec):
        hits = covered(spec, boxes, rh, rw, assigner, atss_topk)
        sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
        for side, hit in zip(sides.tolist(), hits.tolist()):
            for lo, hi in BANDS:
                if lo <= side < hi:
                    counts[_band_name(lo, hi)][0] += 1
                    counts[_band_name(lo, hi)][1] += int(hit)
    return {band: {"objects": n, "covered": c, "covered_pct": _pct(c, n)} for band, (n, c) in counts.items()}


def small_object_coverage(bands: dict[str, dict]) -> dict:
    """The bands under ``SMALL_SIDE`` pooled: objects and the percentage covered (None without small objects)."""
    small = [bands[_band_name(lo, hi)] for lo, hi in BANDS if hi <= SMALL_SIDE]
    objects, hits = sum(b["objects"] for b in small), sum(b["covered"] for b in small)
    return {"objects": objects, "covered": hits, "covered_pct": _pct(hits, objects)}


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None
