"""Output distillation: a detector's predictions towards target predictions on the same anchors or proposals.

The student's outputs towards the assistant's (ScaleKD) or the teacher's (OD), and the anchored assistant's towards
the teacher's; the terms are unweighted (``kd/cls``, FCOS's ``kd/ctr``, ``kd/bbox``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalekd.config import Config
from scalekd.distill import losses as L
from scalekd.models.parts import DetectorParts, StepContext


def output_losses(parts: DetectorParts, pred: dict[str, Tensor], ctx: StepContext, target: dict[str, Tensor],
                  cfg: Config) -> dict[str, Tensor]:
    """``pred`` towards ``target`` on the anchors or proposals of ``ctx`` (the student's step): soft
    classification at ``distill.temperature`` and ``distill.background_weight``, and the box term
    ``experimental.bbox_loss`` on the foreground (bounded by the ground truth's error, or a plain mimic)."""
    k, bbox_loss = cfg.distill, cfg.experimental.bbox_loss
    if parts.one_stage:
        fg, gt_reg = parts.dense_regression_targets(ctx)
        cls = L.soft_sigmoid_loss(pred["cls_logits"].float(), target["cls_logits"].float(), k.temperature,
                                  k.background_weight, normalizer=fg.sum())
        s_reg, t_reg, y = pred["bbox_regression"][fg].float(), target["bbox_regression"][fg].float(), gt_reg[fg]
        out = {"kd/cls": cls}
        if parts.kind == "fcos":
            out["kd/ctr"] = L.centerness_loss(pred["bbox_ctrness"][fg].squeeze(-1).float(),
                                              target["bbox_ctrness"][fg].squeeze(-1).float())
    else:
        labels = torch.cat(ctx.roi_labels)
        y = torch.cat(ctx.roi_regression_targets)
        out = {"kd/cls": L.soft_softmax_loss(pred["class_logits"].float(), target["class_logits"].float(),
                                             k.temperature, k.background_weight)}
        pos = torch.where(labels > 0)[0]
        cols = labels[pos]
        s_reg = pred["box_regression"].float().reshape(labels.shape[0], -1, 4)[pos, cols]
        t_reg = target["box_regression"].float().reshape(labels.shape[0], -1, 4)[pos, cols]
        y = y[pos]
    if bbox_loss == "bounded":
        out["kd/bbox"] = L.bounded_regression_loss(s_reg, t_reg, y, k.margin)
    else:
        out["kd/bbox"] = L.mimic_regression_loss(s_reg, t_reg, bbox_loss)
    return out
