"""CrossKD (Wang et al., CVPR 2024, "CrossKD: Cross-Head Knowledge Distillation for Object Detection"): the
student's dense-head features, part way up each branch, run through the rest of the frozen teacher's head; those
cross-head predictions are distilled towards the teacher's own predictions, while the student's own head learns
from the ground truth alone. The distillation signal then reaches the student's head features through the
teacher's head instead of pulling the student's outputs towards targets its own head may not be able to fit.

Read from the authors' mmdet code (``CrossKDRetinaNet``, ``CrossKDFCOS``): the features are held before the
activation of the ``index``-th conv of each branch (3 of 4 in their RetinaNet and FCOS configs), the student's are
standardised per channel over N*H*W and given the teacher's per-channel mean and std at the same point, then the
activation and the teacher's remaining convs and predictor run. Departures: (1) cross-resolution: the teacher
sees the image at 2x and its paired maps (``distill.pairing``; scale-aligned: its P_{l+1}, on the student's P_l grid
and anchors) take the place of CrossKD's same-size teacher maps; (2) both terms are divided by the number of
foreground anchors (CrossKD's FCOS divides by the summed centre-ness targets) and FCOS's centre-ness is not
distilled, as in CrossKD. Torchvision's RetinaNet and FCOS heads only (four convs per branch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalekd.config import CrossKDConfig
from scalekd.distill import losses as L
from scalekd.distill.losses import standardize_channels
from scalekd.models.parts import DetectorParts, Forward


def conv_blocks(branch: nn.Sequential) -> list[list[nn.Module]]:
    """A head branch as its conv blocks, each ending in its activation: torchvision's RetinaNet nests them
    (``Conv2dNormActivation``: conv, activation), its FCOS lays them flat (conv, GroupNorm, ReLU, ...)."""
    layers = [layer for module in branch for layer in (module if isinstance(module, nn.Sequential) else [module])]
    blocks, current = [], []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, nn.ReLU):
            blocks.append(current)
            current = []
    if current:
        raise ValueError(f"a head branch that does not end in an activation: {branch}")
    return blocks


def hold(branch: nn.Sequential, x: Tensor, index: int) -> Tensor:
    """A head branch's features after ``index`` of its conv blocks, before the last one's activation (``x`` at 0)."""
    blocks = conv_blocks(branch)[:index]
    for i, block in enumerate(blocks):
        for layer in block[:-1] if i == len(blocks) - 1 else block:
            x = layer(x)
    return x


def finish(branch: nn.Sequential, held: Tensor, index: int) -> Tensor:
    """The rest of the branch from what ``hold`` returned: the held block's activation, then the blocks after it."""
    x = F.relu(held) if index else held
    for block in conv_blocks(branch)[index:]:
        for layer in block:
            x = layer(x)
    return x


def align_scale(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """The student's [N, C, H, W] features standardised per channel over N*H*W, then given the teacher's
    per-channel mean and std (CrossKD's ``align_scale``), so the teacher's convs see inputs on their own scale."""
    # The population std, eps under the root (CrossKD: the sample std plus eps): a one-cell map of a one-image
    # batch then gives 0, not NaN. The standardisation is PKD's and SDF's (losses.standardize_channels).
    dims = (0, 2, 3)
    spread = teacher.var(dims, correction=0, keepdim=True).add(eps).sqrt()
    return standardize_channels(student, eps) * spread + teacher.mean(dims, keepdim=True)


def _flatten(x: Tensor, per_anchor: int) -> Tensor:
    """[N, A*K, H, W] -> [N, H*W*A, K], torchvision's head layout (cell-major, then anchor)."""
    n, _, h, w = x.shape
    return x.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


def _outputs(head: Any, cls_features: Tensor, reg_features: Tensor) -> dict[str, Tensor]:
    """One level's predictions of ``head`` (RetinaNet or FCOS) from its branches' last features."""
    cls_head, reg_head = head.classification_head, head.regression_head
    out = {"cls_logits": _flatten(cls_head.cls_logits(cls_features), cls_head.num_classes)}
    box = reg_head.bbox_reg(reg_features)
    if hasattr(reg_head, "bbox_ctrness"):  # FCOS: distances are non-negative, plus its centre-ness
        out["bbox_regression"] = _flatten(F.relu(box), 4)
        out["bbox_ctrness"] = _flatten(reg_head.bbox_ctrness(reg_features), 1)
    else:
        out["bbox_regression"] = _flatten(box, 4)
    return out


def _append(into: dict[str, list[Tensor]], level: dict[str, Tensor]) -> None:
    for key, value in level.items():
        into.setdefault(key, []).append(value)


def cross_head_predictions(student_head: nn.Module, teacher_head: nn.Module, student_maps: list[Tensor],
                           teacher_maps: list[Tensor], index: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(cross, teacher): per anchor, the teacher's head finished on the student's held features (gradients reach
    the student's first ``index`` blocks through the frozen teacher), and the teacher's own predictions on its
    paired maps, both in torchvision's [N, sum(H*W*A), K] layout. Maps of one level share a grid.

    The student's first ``index`` blocks run again here (its forward does not hold them): same values and
    gradients as holding them, one more pass of those blocks."""
    cross: dict[str, list[Tensor]] = {}
    own: dict[str, list[Tensor]] = {}
    for s_map, t_map in zip(student_maps, teacher_maps):
        cross_features, teacher_features = [], []
        for name in ("classification_head", "regression_head"):
            s_branch, t_branch = getattr(student_head, name).conv, getattr(teacher_head, name).conv
            with torch.no_grad():
                t_held = hold(t_branch, t_map, index)
                teacher_features.append(finish(t_branch, t_held, index))
            cross_features.append(finish(t_branch, align_scale(hold(s_branch, s_map, index), t_held), index))
        with torch.no_grad():
            _append(own, _outputs(teacher_head, *teacher_features))
        _append(cross, _outputs(teacher_head, *cross_features))
    return ({k: torch.cat(v, dim=1) for k, v in cross.items()}, {k: torch.cat(v, dim=1) for k, v in own.items()})


def cross_head_losses(student_parts: DetectorParts, teacher_parts: DetectorParts, student_out: Forward,
                      teacher_maps: list[Tensor], k: CrossKDConfig, prefix: str) -> dict[str, Tensor]:
    """CrossKD's terms on the student's anchors, every one not ignored, named ``{prefix}/cls`` and
    ``{prefix}/bbox``: the quality focal loss of the cross-head logits towards the teacher's, and the GIoU of the
    decoded boxes weighted by the teacher's top class score; each per foreground anchor. The student's own outputs
    learn from the ground truth alone."""
    heads = student_parts.prediction_head(), teacher_parts.prediction_head()
    cross, target = cross_head_predictions(*heads, student_out.fpn, teacher_maps, k.head_index)
    ctx = student_out.context
    matched = torch.stack(ctx.matched_idxs)
    valid = (matched >= -1).float()  # -2: between the IoU thresholds, ignored by the detector's own loss
    foreground = (matched >= 0).sum().float()
    target_logits = target["cls_logits"].float()
    cls = L.quality_focal_kd_loss(cross["cls_logits"].float(), target_logits, valid, foreground, k.focal_beta)
    box_weight = target_logits.sigmoid().amax(dim=-1) * valid
    boxes = [student_parts.decode_boxes(p["bbox_regression"].float(), ctx.anchors) for p in (cross, target)]
    box = L.weighted_giou_loss(boxes[0].reshape(-1, 4), boxes[1].reshape(-1, 4), box_weight.reshape(-1), foreground)
    return {f"{prefix}/cls": cls, f"{prefix}/bbox": box}
