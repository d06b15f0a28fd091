"""What distillation needs from each detector, reached through its own submodules.

``DetectorParts`` runs a torchvision detector step by step (transform -> backbone body (C5) -> FPN ->
head) and exposes the pieces: FPN maps, head outputs, anchors/proposals, matching, and the detector's
own loss for *any* set of predictions on the same anchors/proposals, so the Cross-Scale Assistant's
predictions are scored by exactly the student's loss. It adds no parameters and changes no weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import boxes as box_ops

from scalekd.models.detectors import Detector, last_stage_features


@dataclass
class StepContext:
    """Per-batch state shared by the student, the assistant and the distillation losses."""

    image_sizes: list[tuple[int, int]]
    targets: list[dict]
    anchors: list[Tensor] = field(default_factory=list)  # one-stage
    num_anchors_per_level: list[int] = field(default_factory=list)
    matched_idxs: list[Tensor] = field(default_factory=list)
    proposals: list[Tensor] = field(default_factory=list)  # two-stage: sampled RoIs
    roi_labels: list[Tensor] = field(default_factory=list)
    roi_regression_targets: list[Tensor] = field(default_factory=list)


@dataclass
class Forward:
    c5: Tensor
    fpn: list[Tensor]
    fpn_names: list[str]
    predictions: dict[str, Tensor]
    losses: dict[str, Tensor]
    context: StepContext


class DetectorParts:
    def __init__(self, model: nn.Module, assigner: str = "max_iou", atss_topk: int = 9):
        """``assigner``: how RetinaNet's anchors get their ground truth: ``max_iou`` (torchvision's matcher,
        0.4/0.5 with low-quality matches) or ``atss`` (adaptive per object, ``atss_match`` with ``atss_topk``
        candidate cells per level). FCOS and Faster R-CNN keep their own assignment."""
        self.model: Detector = model
        self.assigner = assigner
        self.atss_topk = atss_topk
        if isinstance(model, RetinaNet):
            self.kind = "retinanet"
        elif isinstance(model, FCOS):
            self.kind = "fcos"
        elif isinstance(model, FasterRCNN):
            self.kind = "faster_rcnn"
        else:
            raise TypeError(f"unsupported detector {type(model).__name__}")

    @property
    def one_stage(self) -> bool:
        return self.kind != "faster_rcnn"

    @property
    def min_level(self) -> int:
        """The finest FPN level: 2 when the backbone returns its stride-4 stage (Faster R-CNN, P2-P6 one-stage)."""
        return 2 if len(self.model.backbone.body.return_layers) == 4 else 3

    # -- features -------------------------------------------------------------------------------------
    def features(self, images: list[Tensor], targets: list[dict] | None = None, keep_size: bool = False):
        """Normalise and batch (the detector's own transform), then C5 and the FPN maps.

        ``keep_size`` skips the transform's resize: a teacher run at the student's resolution (the "OD"
        baseline) must produce maps on the student's anchors.
        """
        if keep_size or self._already_sized(images):
            transform = self.model.transform
            normalized = [transform.normalize(im) for im in images]
            sizes = [tuple(im.shape[-2:]) for im in normalized]
            image_list = ImageList(transform.batch_images(normalized, transform.size_divisible), sizes)
        else:
            image_list, targets = self.model.transform(images, targets)
        c5, fpn = last_stage_features(self.model, image_list.tensors)
        return image_list, targets, c5, fpn

    def _already_sized(self, images: list[Tensor]) -> bool:
        """True when the transform's resize would be the identity (scale exactly 1: our collate made the views
        at the detector's size), so the per-iteration no-op interpolation can be skipped."""
        transform = self.model.transform
        if len(transform.min_size) != 1:
            return False
        for image in images:
            h, w = image.shape[-2:]
            if min(transform.min_size[0] / min(h, w), transform.max_size / max(h, w)) != 1.0:
                return False
        return True

    # -- training forward -----------------------------------------------------------------------------
    def forward_train(self, images: list[Tensor], targets: list[dict]) -> Forward:
        image_list, targets, c5, fpn = self.features(images, targets)
        names, maps = list(fpn.keys()), list(fpn.values())
        ctx = StepContext(image_sizes=image_list.image_sizes, targets=targets)
        if self.one_stage:
            ctx.anchors = self.model.anchor_generator(image_list, maps)
            ctx.num_anchors_per_level = [m.shape[2] * m.shape[3] for m in maps]
            ctx.matched_idxs = self.match(targets, ctx.anchors, ctx.num_anchors_per_level)
            predictions = self.model.head(maps)
            losses = self.model.head.compute_loss(targets, predictions, ctx.anchors, ctx.matched_idxs)
        else:
            rpn = self.model.rpn
            proposals, rpn_losses = rpn(image_list, fpn, targets)
            roi = self.model.roi_heads
            proposals, _, labels, regression_targets = roi.select_training_samples(proposals, targets)
            ctx.proposals, ctx.roi_labels, ctx.roi_regression_targets = proposals, labels, regression_targets
            predictions = self.predict(maps, names, ctx)
            losses = {**rpn_losses, **self.loss(predictions, ctx)}
        return Forward(c5, maps, names, predictions, losses, ctx)

    def teacher_features(self, images: list[Tensor], keep_size: bool = False) -> tuple[Tensor, list[Tensor]]:
        """C5 and FPN maps of a frozen teacher (call under ``torch.no_grad`` in eval mode)."""
        _, _, c5, fpn = self.features(images, keep_size=keep_size)
        return c5, list(fpn.values())

    # -- predictions and losses on given features ------------------------------------------------------
    def prediction_head(self) -> nn.Module:
        """The weights ``predict`` runs: the dense head, or the RoI box head and predictor."""
        if self.one_stage:
            return self.model.head
        roi = self.model.roi_heads
        return nn.ModuleDict({"box_head": roi.box_head, "box_predictor": roi.box_predictor})

    def predict(self, maps: list[Tensor], names: list[str], ctx: StepContext | None,
                head: nn.Module | None = None) -> dict[str, Tensor]:
        """Head outputs for FPN maps on the context's anchors (dense) or sampled proposals (RoI).

        ``head`` (shaped like ``prediction_head()``) runs other weights on the same anchors/proposals; a dense
        head needs no context."""
        if self.one_stage:
            return (head or self.model.head)(maps)
        if ctx is None:
            raise ValueError("RoI predictions need the step's context (its sampled proposals)")
        roi = self.model.roi_heads
        weights: Any = head if head is not None else roi  # both hold a box_head and a box_predictor
        box_head, box_predictor = weights.box_head, weights.box_predictor
        features = dict(zip(names, maps))
        pooled = roi.box_roi_pool(features, ctx.proposals, ctx.image_sizes)
        class_logits, box_regression = box_predictor(box_head(pooled))
        return {"class_logits": class_logits, "box_regression": box_regression}

    def loss(self, predictions: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        """The detector's own loss of these predictions (the RoI head's, for two-stage)."""
        if self.one_stage:
            return self.model.head.compute_loss(ctx.targets, predictions, ctx.anchors, ctx.matched_idxs)
        cls_loss, box_loss = fastrcnn_loss(predictions["class_logits"], predictions["box_regression"],
                                           ctx.roi_labels, ctx.roi_regression_targets)
        return {"loss_classifier": cls_loss, "loss_box_reg": box_loss}

    def match(self, targets: list[dict], anchors: list[Tensor], num_per_level: list[int]) -> list[Tensor]:
        """Ground-truth index per anchor (-1 background, -2 ignored), as the detector's loss matches."""
        out = []
        for anchors_i, targets_i in zip(anchors, targets):
            if targets_i["boxes"].numel() == 0:
                out.append(torch.full((anchors_i.size(0),), -1, dtype=torch.int64, device=anchors_i.device))
            elif self.kind == "retinanet" and self.assigner == "atss":
                out.append(atss_match(targets_i["boxes"], anchors_i, num_per_level, self.atss_topk))
            elif self.kind == "retinanet":
                out.append(self.model.proposal_matcher(box_ops.box_iou(targets_i["boxes"], anchors_i)))
            else:
                out.append(_fcos_match(targets_i["boxes"], anchors_i, num_per_level,
                                       self.model.center_sampling_radius))
        return out

    def dense_regression_targets(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """Foreground mask [N, A] and encoded ground-truth regression targets [N, A, 4]."""
        fg, encoded = [], []
        coder = self._box_coder()
        for anchors_i, targets_i, matched in zip(ctx.anchors, ctx.targets, ctx.matched_idxs):
            boxes = targets_i["boxes"]
            if boxes.numel() == 0:
                gt = anchors_i.new_zeros(anchors_i.shape)
            else:
                gt = boxes[matched.clamp(min=0)]
            fg.append(matched >= 0)
            if self.kind == "retinanet":
                encoded.append(coder.encode_single(gt, anchors_i))
            else:
                encoded.append(coder.encode(anchors_i, gt))
        return torch.stack(fg), torch.stack(encoded)

    def decode_boxes(self, regression: Tensor, anchors: list[Tensor]) -> Tensor:
        """A dense head's [N, A, 4] regression outputs as (x1, y1, x2, y2) boxes on each image's anchors."""
        coder = self._box_coder()
        if self.kind == "retinanet":
            return torch.stack([coder.decode_single(r, a) for r, a in zip(regression, anchors)])
        return torch.stack([coder.decode(r, a) for r, a in zip(regression, anchors)])

    def _box_coder(self):
        return self.model.head.regression_head.box_coder if self.kind == "retinanet" else self.model.head.box_coder


def atss_match(gt_boxes: Tensor, anchors: Tensor, cells_per_level: list[int], topk_cells: int = 9,
               low_quality: bool = True) -> Tensor:
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020): ground-truth index per anchor, -1 background.

    Per object and per level, the anchors of the ``topk_cells`` cells whose centres are nearest the object's centre
    are candidates; those with IoU >= the candidates' mean + std whose centres lie inside the box are positive; an
    anchor claimed by several objects goes to the one it overlaps most. The threshold adapts to the object: a 5 px
    object whose best anchor reaches IoU 0.3 still gets positives, where a fixed 0.5 leaves it one low-quality match and
    trains its neighbours as background. ATSS's detector has one anchor per cell and takes the 9 nearest; with
    RetinaNet's 9 anchors per cell the original code takes ``topk_cells`` x 9 (nine cells' worth); mmdetection's
    ATSSAssigner takes 9 anchors (``topk_cells=1``).

    ``low_quality`` (departs from ATSS, which has no such rule): an object left without a positive (a 2-3 px
    object with no anchor centre inside it) gets its best-overlapping anchor if no other object holds it, as
    torchvision's matcher gives every object its best anchor; without it such objects would be trained as
    background. Coverage (``scalekd.data.coverage``) counts ATSS's own positives only."""
    ious = box_ops.box_iou(gt_boxes, anchors)  # [G, N]
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    distances = torch.cdist((gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2, anchor_centers)  # [G, N]
    per_cell = anchors.size(0) // sum(cells_per_level)
    per_level, start = [], 0
    for count in (cells * per_cell for cells in cells_per_level):
        nearest = distances[:, start:start + count].topk(min(topk_cells * per_cell, count), dim=1,
                                                         largest=False).indices
        per_level.append(nearest + start)
        start += count
    candidates = torch.cat(per_level, dim=1)  # [G, K]
    candidate_ious = ious.gather(1, candidates)
    threshold = candidate_ious.mean(dim=1, keepdim=True) + candidate_ious.std(dim=1, keepdim=True)
    cx, cy = anchor_centers[candidates, 0], anchor_centers[candidates, 1]  # [G, K]
    inside = ((cx > gt_boxes[:, 0:1]) & (cx < gt_boxes[:, 2:3]) & (cy > gt_boxes[:, 1:2]) & (cy < gt_boxes[:, 3:4]))
    positive = (candidate_ious >= threshold) & inside & (candidate_ious > 0)
    claims = torch.full_like(ious, -1.0)  # IoU where the anchor is a positive of that object, else -1
    objects = torch.arange(gt_boxes.size(0), device=gt_boxes.device)[:, None].expand_as(candidates)
    claims[objects[positive], candidates[positive]] = candidate_ious[positive]
    best, index = claims.max(dim=0)
    index[best < 0] = -1
    if low_quality:
        orphan = torch.ones(gt_boxes.size(0), dtype=torch.bool, device=gt_boxes.device)
        orphan[index[index >= 0]] = False
        best_iou, best_anchor = ious.max(dim=1)
        rescued = orphan & (best_iou > 0) & (index[best_anchor] < 0)
        index[best_anchor[rescued]] = rescued.nonzero().squeeze(1)
    return index


def _fcos_match(gt_boxes: Tensor, anchors: Tensor, num_per_level: list[int], radius: float) -> Tensor:
    """torchvision's FCOS.compute_loss assignment (center sampling, per-level size ranges, min area)."""
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    anchor_sizes = anchors[:, 2] - anchors[:, 0]
    match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(dim=2).values < (
        radius * anchor_sizes[:, None])
    x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)
    x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
    dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
    match &= dist.min(dim=2).values > 0
    lower = anchor_sizes * 4
    lower[: num_per_level[0]] = 0
    upper = anchor_sizes * 8
    upper[-num_per_level[-1]:] = float("inf")
    dist = dist.max(dim=2).values
    match &= (dist > lower[:, None]) & (dist < upper[:, None])
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    scored = match.to(torch.float32) * (1e8 - areas[None, :])
    best, idx = scored.max(dim=1)
    idx[best < 1e-5] = -1
    return idx
