import math

import pytest

import torch

from scalekd.distill import losses as L


def test_bounded_regression_is_zero_where_student_beats_assistant_by_margin():
    gt = torch.zeros(3, 4)
    student = torch.tensor([[0.1, 0, 0, 0], [1.0, 0, 0, 0], [0.5, 0, 0, 0]])
    assistant = torch.tensor([[0.5, 0, 0, 0], [0.2, 0, 0, 0], [0.5, 0, 0, 0]])
    # errors: student .01, 1.0, .25 ; assistant .25, .04, .25 ; margin .1
    # row 0: .01 + .1 > .25? no -> 0 ; row 1: yes -> 1.0 ; row 2: .35 > .25 -> .25
    loss = L.bounded_regression_loss(student, assistant, gt, margin=0.1)
    assert math.isclose(loss.item(), (0 + 1.0 + 0.25) / 3, rel_tol=1e-6)
    assert L.bounded_regression_loss(student[:1], assistant[:1], gt[:1], margin=0.1).item() == 0.0
    assert L.bounded_regression_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0.0


def test_soft_softmax_loss_matches_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[0.0, 1.0, 0.0]])
    t = 2.0
    p = torch.softmax(target / t, -1)
    log_q = torch.log_softmax(student / t, -1)
    weights = torch.tensor([1.5, 1.0, 1.0])
    expected = (p * (torch.log(p) - log_q) * weights).sum() * t * t
    assert torch.allclose(L.soft_softmax_loss(student, target, t, 1.5), expected)
    assert L.soft_softmax_loss(target, target, t).abs().item() < 1e-6


def test_soft_sigmoid_loss_weights_background_anchors():
    student = torch.zeros(1, 2, 2)
    target = torch.tensor([[[4.0, -4.0], [-4.0, -4.0]]])  # anchor 0 foreground, anchor 1 background
    soft = torch.sigmoid(target)
    bce = -(soft * math.log(0.5) + (1 - soft) * math.log(0.5))
    entropy = -(soft * torch.log(soft) + (1 - soft) * torch.log(1 - soft))
    kl = bce - entropy
    expected = (kl[0, 0].sum() * 1.0 + kl[0, 1].sum() * 1.5) / 1.0
    assert torch.allclose(L.soft_sigmoid_loss(student, target, 1.0, 1.5, normalizer=1.0), expected)
    assert L.soft_sigmoid_loss(target, target).abs().item() < 1e-6


def test_feature_loss_is_scale_invariant_when_standardised():
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.allclose(L.feature_l2_loss(a, b), L.feature_l2_loss(10 * a, b), atol=1e-4)
    assert L.feature_l2_loss(a, a).item() < 1e-8
    assert torch.allclose(L.feature_l2_loss(a, b, standardize=False), ((a - b) ** 2).mean())


def test_mimic_and_centerness_losses():
    s, t = torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[1.0, 2, 3, 6]])
    assert torch.allclose(L.mimic_regression_loss(s, t, "l2"), torch.tensor(1.0))
    assert L.mimic_regression_loss(s, s, "smooth_l1").item() == 0.0
    x = torch.tensor([0.3, -2.0])
    assert L.centerness_loss(x, x).item() < L.centerness_loss(-x, x).item()


def test_quality_focal_kd_loss_by_hand_and_zero_where_scores_agree():
    logits = torch.tensor([[[0.3, -1.0], [2.0, 0.5]]])
    weight = torch.ones(1, 2)
    assert L.quality_focal_kd_loss(logits, logits.clone(), weight, torch.tensor(1.0)).item() == pytest.approx(0.0)
    student, target = torch.tensor([[[0.0]]]), torch.tensor([[[math.log(3.0)]]])  # sigmoid: 0.5 and 0.75
    by_hand = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5)) * abs(0.5 - 0.75)
    got = L.quality_focal_kd_loss(student, target, torch.ones(1, 1), torch.tensor(0.0))  # normaliser floored at 1
    assert got.item() == pytest.approx(by_hand, rel=1e-5)
    ignored = L.quality_focal_kd_loss(student, target, torch.zeros(1, 1), torch.tensor(1.0))
    assert ignored.item() == 0.0
    halved = L.quality_focal_kd_loss(student, target, torch.ones(1, 1), torch.tensor(2.0))
    assert halved.item() == pytest.approx(by_hand / 2, rel=1e-5)


def test_weighted_giou_loss_is_zero_for_the_same_boxes_and_weighs_each_box():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 5.0]])
    assert L.weighted_giou_loss(boxes, boxes.clone(), torch.ones(2), torch.tensor(1.0)).item() == pytest.approx(0.0)
    shifted = boxes + torch.tensor([2.0, 0.0, 2.0, 0.0])  # first box: touching, IoU 0, hull 4x2: GIoU 0 -> loss 1
    weight = torch.tensor([0.5, 0.0])
    got = L.weighted_giou_loss(shifted, boxes, weight, torch.tensor(1.0))
    assert got.item() == pytest.approx(0.5, rel=1e-5)
