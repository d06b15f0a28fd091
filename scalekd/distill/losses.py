"""Distillation losses as pure functions of tensors.

Output distillation follows Chen et al. 2017 ("Learning efficient object detection models with
knowledge distillation", the paper's [5]); in ScaleKD the soft and bounding targets come from the
Cross-Scale Assistant rather than the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss


def standardize_channels(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero-mean, unit-variance per channel over batch and space: [N, C, H, W] -> same shape."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def feature_l2_loss(student: Tensor, teacher: Tensor, standardize: bool = True) -> Tensor:
    """L_feat: mean squared error between [N, C, H, W] embeddings.

    Departs from the paper (which gives only "an L2 loss"): with ``standardize`` each channel is
    standardised first, making the loss invariant to the projection's scale so a shared SDF cannot
    lower it by shrinking its outputs towards zero (docs/method.md, interpretation ``teacher_sdf=shared``).
    """
    if standardize:
        student, teacher = standardize_channels(student), standardize_channels(teacher)
    return F.mse_loss(student, teacher)


def pkd_loss(student_maps: list[Tensor], teacher_maps: list[Tensor], eps: float = 1e-6) -> Tensor:
    """PKD (Cao et al., NeurIPS 2022): per level, each channel standardised over N*H*W in both maps, then MSE/2;
    summed over levels (mmrazor's PKDLoss, one weight for every level). 1 - Pearson correlation per channel,
    so zero when the student's map is the teacher's up to a positive affine map per channel. Maps of a level
    must share a grid (the distiller pairs or pools them first)."""
    total = student_maps[0].new_zeros(())
    for s, t in zip(student_maps, teacher_maps):
        total = total + F.mse_loss(standardize_channels(s, eps), standardize_channels(t, eps)) / 2
    return total


def soft_sigmoid_loss(student_logits: Tensor, target_logits: Tensor, temperature: float = 1.0,
                      background_weight: float = 1.5, normalizer: float | Tensor = 1.0) -> Tensor:
    """L_cls for per-class sigmoid heads (RetinaNet, FCOS): [N, A, K] logits each.

    Binary KL divergence to sigmoid(target / T), scaled by T^2: soft cross-entropy minus the targets'
    entropy, so Chen et al.'s gradients but zero when the student matches. Chen et al. weight the
    background class by 1.5; a sigmoid head has no background class, so anchors the target calls
    background (max probability < 0.5) get ``background_weight`` (interpretation). Summed and divided
    by ``normalizer`` (the number of foreground anchors), like the focal loss it sits beside.
    """
    t = temperature
    soft = torch.sigmoid(target_logits / t)
    per_elem = (F.binary_cross_entropy_with_logits(student_logits / t, soft, reduction="none")
                - F.binary_cross_entropy_with_logits(target_logits / t, soft, reduction="none"))
    background = soft.max(dim=-1, keepdim=True).values < 0.5
    weights = torch.where(background, torch.full_like(soft[..., :1], background_weight), torch.ones_like(soft[..., :1]))
    # A tensor normalizer stays on the device (no host sync per iteration).
    floor = normalizer.clamp(min=1.0) if torch.is_tensor(normalizer) else max(normalizer, 1.0)
    return (per_elem * weights).sum() * (t * t) / floor


def soft_softmax_loss(student_logits: Tensor, target_logits: Tensor, temperature: float = 1.0,
                      background_weight: float = 1.5) -> Tensor:
    """L_cls for softmax RoI heads (Faster R-CNN): [R, K+1] logits, class 0 background (Chen et al. eq. 3).

    Class-weighted soft cross-entropy minus the targets' (weighted) entropy: Chen et al.'s gradients,
    zero at a match."""
    t = temperature
    soft = F.softmax(target_logits / t, dim=-1)
    log_p = F.log_softmax(student_logits / t, dim=-1)
    log_q = F.log_softmax(target_logits / t, dim=-1)
    weights = torch.ones(student_logits.shape[-1], device=student_logits.device, dtype=log_p.dtype)
    weights[0] = background_weight
    return (soft * (log_q - log_p) * weights).sum(dim=-1).mean() * (t * t)


def bounded_regression_loss(student: Tensor, target: Tensor, ground_truth: Tensor, margin: float = 0.0) -> Tensor:
    """L_bbox, Chen et al. eq. 4: ||R_s - y||^2 where it exceeds ||R_t - y||^2 - margin, else 0.

    [P, 4] each (positive anchors/RoIs only). The student is pushed towards the ground truth only where
    the target (the assistant, in ScaleKD) regresses better than it by more than the margin.
    """
    if student.numel() == 0:
        return student.sum() * 0.0
    student_err = (student - ground_truth).pow(2).sum(dim=-1)
    target_err = (target - ground_truth).pow(2).sum(dim=-1)
    active = (student_err + margin > target_err).to(student_err.dtype)
    return (student_err * active).mean()


def mimic_regression_loss(student: Tensor, target: Tensor, kind: str = "l2") -> Tensor:
    """Direct mimicry of the target's regression on positives: [P, 4] each."""
    if student.numel() == 0:
        return student.sum() * 0.0
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, target, beta=1.0 / 9)
    return F.mse_loss(student, target)


def centerness_loss(student_logits: Tensor, target_logits: Tensor) -> Tensor:
    """FCOS centerness distillation on positives: BCE against sigmoid(target). [P] each."""
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(student_logits, torch.sigmoid(target_logits))


def quality_focal_kd_loss(student_logits: Tensor, target_logits: Tensor, weight: Tensor, normalizer: Tensor,
                          beta: float = 1.0) -> Tensor:
    """CrossKD's classification term (``KDQualityFocalLoss``): per anchor and class, BCE towards sigmoid(target)
    times |sigmoid(student) - sigmoid(target)|^beta, so it is zero where the two scores agree and anchors the
    target already calls easy weigh little. [N, A, K] logits, ``weight`` [N, A] (0 for ignored anchors); summed
    and divided by ``normalizer`` (the foreground anchors, floored at 1; a tensor stays on the device)."""
    soft = torch.sigmoid(target_logits)
    focal = (torch.sigmoid(student_logits) - soft).abs().pow(beta)
    per_anchor = (F.binary_cross_entropy_with_logits(student_logits, soft, reduction="none") * focal).sum(dim=-1)
    return (per_anchor * weight).sum() / normalizer.clamp(min=1.0)


def weighted_giou_loss(student_boxes: Tensor, target_boxes: Tensor, weight: Tensor, normalizer: Tensor) -> Tensor:
    """CrossKD's box term: 1 - GIoU between decoded (x1, y1, x2, y2) boxes [M, 4], weighted per box (CrossKD: the
    target's top class score, 0 for ignored anchors), summed and divided by ``normalizer`` (floored at 1)."""
    per_box = generalized_box_iou_loss(student_boxes, target_boxes, reduction="none")
    return (per_box * weight).sum() / normalizer.clamp(min=1.0)
