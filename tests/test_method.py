import pytest
import torch

from scalekd.config import ConfigError, replace
from scalekd.distill.assisted import AssistedDetector
from scalekd.distill.csa import CrossScaleAttention
from scalekd.distill.distiller import Distiller
from scalekd.distill.sdf import ScaleDecoupledFeatures
from scalekd.models.detectors import SingleValueGroupNorm, build_detector
from scalekd.models.parts import DetectorParts
from scalekd.geometry import student_spec
from tests.helpers import build_pair, changed, distiller_with_optimizers, snapshot, tiny_batch

DETECTORS = ("retinanet", "fcos", "faster_rcnn")


@pytest.mark.parametrize("detector", DETECTORS)
def test_feature_shapes_at_every_level_teacher_twice_the_student(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector})
    student, teacher = build_pair(cfg)
    batch = tiny_batch(cfg)
    s = DetectorParts(student).forward_train(batch.student_images, batch.student_targets)
    with torch.no_grad():
        t_c5, t_maps = DetectorParts(teacher.eval()).teacher_features(batch.teacher_images)
    assert len(s.fpn) == len(t_maps) == 5
    for s_map, t_map in zip(s.fpn, t_maps):
        assert s_map.shape[1] == t_map.shape[1] == cfg.model.fpn_channels
        if s_map.shape[-1] > 1:
            assert t_map.shape[-2:] == (2 * s_map.shape[-2], 2 * s_map.shape[-1])
    assert t_c5.shape[-2:] == (2 * s.c5.shape[-2], 2 * s.c5.shape[-1])
    assert {k.split("/")[0] for k in s.losses} or s.losses


def test_shared_sdf_has_a_third_of_the_block_parameters():
    shared = ScaleDecoupledFeatures(64, 128, 32, (1, 2, 3), weight_sharing=True)
    separate = ScaleDecoupledFeatures(64, 128, 32, (1, 2, 3), weight_sharing=False)
    n_shared = sum(p.numel() for p in shared.blocks.parameters())
    n_separate = sum(p.numel() for p in separate.blocks.parameters())
    assert 3 * n_shared == n_separate
    s, t = shared(torch.randn(2, 64, 4, 4), torch.randn(2, 128, 8, 8))
    assert s.shape == t.shape == (2, 3 * 32, 4, 4)


def test_sdf_branches_differ_by_dilation_only():
    sdf = ScaleDecoupledFeatures(8, 16, 4, (1, 2, 3)).eval()
    x = torch.randn(1, 16, 9, 9)
    block = sdf.blocks[0]
    outs = [block(x, d) for d in (1, 2, 3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


@pytest.mark.parametrize("detector", DETECTORS)
def test_assistant_step_moves_only_the_assistant(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector})
    distiller, opt = distiller_with_optimizers(cfg, student_lr=0.0)
    opt.student.param_groups[0]["momentum"] = 0.0
    before_student, before_csa = snapshot(distiller.student), snapshot(distiller.csa)
    before_teacher, before_sdf = snapshot(distiller.teacher), snapshot(distiller.sdf)
    distiller.train_step(tiny_batch(cfg), opt)
    assert changed(before_csa, distiller.csa)  # the assistant learned from ground truth
    assert not changed(before_student, distiller.student)
    assert not changed(before_teacher, distiller.teacher)
    assert not changed(before_sdf, distiller.sdf)
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.parametrize("detector", DETECTORS)
def test_student_step_moves_no_teacher_or_assistant_parameter(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector})
    distiller, opt = distiller_with_optimizers(cfg, assistant_lr=0.0)
    before_student, before_csa, before_teacher = (snapshot(distiller.student), snapshot(distiller.csa),
                                                  snapshot(distiller.teacher))
    logs = distiller.train_step(tiny_batch(cfg), opt)
    assert {"kd/feat", "kd/cls", "kd/bbox"} <= set(logs)
    assert any(k.startswith("assistant/") for k in logs)
    assert changed(before_student, distiller.student)
    assert not changed(before_csa, distiller.csa)
    assert not changed(before_teacher, distiller.teacher)
    assert all(not p.requires_grad and p.grad is None for p in distiller.teacher.parameters())


def test_teacher_is_not_part_of_the_distillers_state_or_parameters(tiny_cfg):
    distiller, _ = distiller_with_optimizers(tiny_cfg)
    teacher_ids = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert not any(k.startswith("_teacher") for k in distiller.state_dict())
    distiller.train()
    assert not distiller.teacher.training


def test_a_32_channel_fcos_detects_one_64_px_image_and_its_group_norm_matches_torchs(tiny_cfg):
    # FPN 32 with GroupNorm(32): the 1x1 P7 of one 64 px image holds one value per group (torch's F.group_norm
    # refuses it, and the export of such a model failed).
    model = build_detector(student_spec(replace(tiny_cfg, model={"detector": "fcos"}), 4)).eval()
    with torch.no_grad():
        assert set(model([torch.rand(3, 64, 64)])[0]) == {"boxes", "scores", "labels"}
    torch_norm, ours = torch.nn.GroupNorm(32, 32), SingleValueGroupNorm(32, 32)
    torch.nn.init.normal_(torch_norm.bias)
    ours.load_state_dict(torch_norm.state_dict())
    x = torch.randn(2, 32, 3, 3)
    assert torch.equal(ours(x), torch_norm(x))
    one_value = ours(torch.randn(1, 32, 1, 1)).flatten()  # (x - mean) is 0, up to rounding times 1/sqrt(eps)
    assert torch.allclose(one_value, torch_norm.bias, atol=1e-4)


def test_distilled_student_has_exactly_the_plain_students_keys_and_shapes(tiny_cfg):
    distiller, opt = distiller_with_optimizers(tiny_cfg)
    distiller.train_step(tiny_batch(tiny_cfg), opt)
    plain = build_detector(student_spec(tiny_cfg, 4)).state_dict()
    distilled = distiller.student.state_dict()
    assert list(plain) == list(distilled)
    assert all(plain[k].shape == distilled[k].shape for k in plain)


@pytest.mark.parametrize("detector", DETECTORS)
def test_full_iterations_lower_the_loss_on_a_tiny_batch(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector})
    distiller, opt = distiller_with_optimizers(cfg, student_lr=0.01)
    batch = tiny_batch(cfg)
    torch.manual_seed(0)
    # The student's detection loss must fall; the distillation terms move with the assistant's targets.
    logs = [distiller.train_step(batch, opt) for _ in range(6)]
    det = [float(sum(v for k, v in step.items() if k.startswith("det/"))) for step in logs]
    assert det[-1] < det[0], det
    assert all(torch.isfinite(step["loss/total"]) for step in logs)


def test_kd_scale_weighs_the_distillation_terms_and_never_the_detection_loss(tiny_cfg):
    """``distill.kd_ramp_iterations``: the loop's factor on alpha, beta and gamma, 1/N, 2/N, ... then 1."""
    from scalekd.train.loop import kd_ramp

    assert [kd_ramp(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kd_ramp(0, 0) == 1.0
    batch = tiny_batch(tiny_cfg)
    totals = {}
    for scale in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        distiller, opt = distiller_with_optimizers(tiny_cfg, student_lr=0.0, assistant_lr=0.0)
        logs = distiller.train_step(batch, opt, kd_scale=scale)
        alpha, beta, gamma = tiny_cfg.loss_weights()
        cross = tiny_cfg.cross_head_weight  # the default's cross-head terms are distillation terms too
        weights = {"kd/feat": alpha, "kd/cls": beta, "kd/ctr": beta, "kd/bbox": gamma, "cross/cls": cross,
                   "cross/bbox": cross}
        assert cross > 0 and {"cross/cls", "cross/bbox"} <= set(logs)
        det = sum(float(v) for k, v in logs.items() if k.startswith("det/"))
        kd = sum(weights[k] * float(v) for k, v in logs.items() if k.startswith(("kd/", "cross/")))
        assert kd > 0
        totals[scale] = (float(logs["loss/total"]), det + scale * kd)
    for total, expected in totals.values():
        assert total == pytest.approx(expected, rel=1e-5)
    assert totals[0.0][0] < totals[0.5][0] < totals[1.0][0]


def test_sdf_projection_does_not_collapse_over_a_short_run(tiny_cfg):
    distiller, opt = distiller_with_optimizers(tiny_cfg, student_lr=0.02)
    batch = tiny_batch(tiny_cfg)

    def teacher_side_std() -> float:
        with torch.no_grad():
            t_c5, _ = distiller.teacher_parts.teacher_features(batch.teacher_images)
            s_c5 = distiller.student_parts.features(batch.student_images)[2]
            _, t_emb = distiller.sdf(s_c5, t_c5)
        return float(t_emb.std(dim=(0, 2, 3)).mean())

    start = teacher_side_std()
    for _ in range(15):
        distiller.train_step(batch, opt)
    assert teacher_side_std() > 0.2 * start


def test_attention_memory_is_student_tokens_times_pooled_teacher_tokens(monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    h = w = 16
    student, teacher = torch.randn(1, 32, h, w), torch.randn(1, 32, 2 * h, 2 * w)
    out = CrossScaleAttention(32, heads=4, rates=(2, 4))(student, teacher)
    assert out.shape == student.shape
    # rate 2 on the 2x teacher map -> h*w keys; rate 4 -> h*w/4 keys; never (2h*2w) keys.
    assert calls == [(h * w, h * w), (h * w, h * w // 4)]
    calls.clear()
    CrossScaleAttention(32, heads=4, attention="plain")(student, teacher)
    assert calls == [(h * w, 4 * h * w)]  # the plain ablation attends to every teacher token


def test_baselines_and_ablations_run_through_the_same_step(tiny_cfg):
    batch = tiny_batch(tiny_cfg)
    variants = {
        "none": {"method": "none"}, "fitnet": {"method": "fitnet"}, "od": {"method": "od"},
        "no_sdf": {"sdf": {"enabled": False}}, "no_csa": {"csa": {"enabled": False}},
        "plain_attention": {"csa": {"attention": "plain"}}, "separate_sdf": {"sdf": {"weight_sharing": False}},
        "frozen_teacher_sdf": {}, "recompute": {}, "l2_bbox": {}, "crosskd": {"method": "crosskd"},
    }
    experimental = {"frozen_teacher_sdf": {"teacher_sdf": "frozen"}, "recompute": {"csa_recompute": True},
                    "l2_bbox": {"bbox_loss": "l2"}}
    for name, overrides in variants.items():
        cfg = replace(tiny_cfg, distill=overrides, experimental=experimental.get(name, {}))
        distiller, opt = distiller_with_optimizers(cfg)
        logs = distiller.train_step(batch, opt)
        assert torch.isfinite(logs["loss/total"]), name
        has_feat = name not in ("none", "od", "no_sdf", "crosskd")
        assert ("kd/feat" in logs) == has_feat, name
        assert ("kd/cls" in logs) == (name not in ("none", "fitnet", "no_csa")), name


def test_method_none_needs_no_teacher_and_others_do(tiny_cfg):
    student, _ = build_pair(tiny_cfg)
    Distiller(student, None, replace(tiny_cfg, distill={"method": "none"}))
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(student, None, tiny_cfg)


def test_position_codes_match_a_student_cell_to_the_teacher_cells_over_the_same_region():
    from scalekd.distill.csa import sine_position_encoding

    h = w = 8
    student = sine_position_encoding(h, w, 64, torch.device("cpu"), torch.float32)
    teacher = sine_position_encoding(2 * h, 2 * w, 64, torch.device("cpu"), torch.float32)  # 2x grid
    similarity = student @ teacher.T  # [h*w, 4*h*w]
    best = similarity.argmax(dim=1)
    ty, tx = best // (2 * w), best % (2 * w)
    sy, sx = torch.arange(h * w) // w, torch.arange(h * w) % w
    # the most similar teacher cell lies inside the student cell's 2x2 footprint on the teacher grid
    assert ((ty // 2 == sy) & (tx // 2 == sx)).all()


def test_position_codes_reach_queries_and_keys_but_not_values():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 32, 6, 6), torch.randn(1, 32, 12, 12)
    with_codes = CrossScaleAttention(32, heads=4, rates=(2, 4), positional="sine")
    without = CrossScaleAttention(32, heads=4, rates=(2, 4), positional="none")
    without.load_state_dict(with_codes.state_dict())  # same parameters: the codes add none
    assert not torch.allclose(with_codes(student, teacher), without(student, teacher))
    # a constant teacher map under plain attention (no depth-wise conv, whose zero padding marks the
    # border): keys differ only by position and every value is the same, so the output cannot change
    plain_codes = CrossScaleAttention(32, heads=4, attention="plain", positional="sine")
    plain = CrossScaleAttention(32, heads=4, attention="plain", positional="none")
    plain.load_state_dict(plain_codes.state_dict())
    flat = torch.ones(1, 32, 12, 12)
    torch.testing.assert_close(plain_codes(student, flat), plain(student, flat), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("detector", DETECTORS)
def test_an_assistant_with_its_own_head_trains_it_and_leaves_the_students_alone(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector}, distill={"csa": {"head": "own", "starts_as": "student"}})
    distiller, opt = distiller_with_optimizers(cfg, student_lr=0.0)
    opt.student.param_groups[0]["momentum"] = 0.0
    own = distiller.assistant_head
    student_head = distiller.student_parts.prediction_head()
    assert set(snapshot(own)) == set(snapshot(student_head))  # a copy of the warm student's head...
    assert all(torch.equal(a, b) for a, b in zip(own.parameters(), student_head.parameters()))
    assert {id(p) for p in own.parameters()}.isdisjoint(id(p) for p in distiller.student_parameters())
    before_student, before_own = snapshot(distiller.student), snapshot(own)
    distiller.train_step(tiny_batch(cfg), opt)
    assert changed(before_own, own)  # ...that the assistant trains
    assert not changed(before_student, distiller.student)
    # kept out of the student's state dict (no inference cost), saved with the distiller for resume
    assert not any(k.startswith("assistant_head") for k in distiller.student.state_dict())
    assert any(k.startswith("assistant_head.") for k in distiller.state_dict())


def test_the_assistants_warmup_step_moves_the_assistant_and_nothing_of_the_student(tiny_cfg):
    cfg = replace(tiny_cfg, distill={"csa": {"head": "own"}})
    distiller, opt = distiller_with_optimizers(cfg)  # the student's optimizer could move it: it must not be used
    before_student, before_csa = snapshot(distiller.student), snapshot(distiller.csa)
    before_own = snapshot(distiller.assistant_head)
    logs = distiller.assistant_warmup_step(tiny_batch(cfg), opt)
    assert changed(before_csa, distiller.csa) and changed(before_own, distiller.assistant_head)
    assert not changed(before_student, distiller.student)
    assert logs and all(k.startswith("assistant/") for k in logs if k != "loss/total")


def test_a_frozen_assistant_head_stays_the_teachers_and_only_the_attention_trains(tiny_cfg):
    cfg = replace(tiny_cfg, distill={"csa": {"starts_as": "teacher", "head_lr": 0.0}})
    distiller, opt = distiller_with_optimizers(cfg)
    head = distiller.assistant_head
    assert not any(p.requires_grad for p in head.parameters())
    assert {id(p) for p in distiller.assistant_parameters()} == {id(p) for p in distiller.csa.parameters()}
    before_head, before_csa = snapshot(head), snapshot(distiller.csa)
    for _ in range(2):  # the zero-initialised projection moves first, then the rest of the attention
        distiller.assistant_warmup_step(tiny_batch(cfg), opt)
    assert not changed(before_head, head) and changed(before_csa, distiller.csa)
    slow = replace(cfg, distill={"csa": {"head_lr": 1e-5}})
    groups = Distiller(*build_pair(slow), slow).assistant_param_groups()
    assert [g.get("lr") for g in groups] == [None, 1e-5]  # the CSA at the optimizer's lr (csa.lr), the head slower
    # At the CSA's rate (the default) one group, as the checkpoints saved before csa.head_lr existed hold.
    same = Distiller(*build_pair(tiny_cfg), tiny_cfg)
    assert len(same.assistant_param_groups()) == 1 and len(same.assistant_parameters()) == len(
        list(same.csa.parameters())) + len(list(same.assistant_head.parameters()))
    with pytest.raises(ConfigError, match="distill.csa.head_lr"):
        replace(cfg, distill={"csa": {"head_lr": -1e-4}})


def test_a_frozen_assistant_has_no_optimizer_builds_no_graph_and_stays_the_teachers(tiny_cfg):
    cfg = replace(tiny_cfg, distill={"csa": {"starts_as": "teacher", "lr": 0.0, "warmup_iterations": 0}})
    distiller, opt = distiller_with_optimizers(cfg)
    assert not distiller.assistant_trains and distiller.assistant_param_groups() == [] and opt.assistant is None
    assert not any(p.requires_grad for p in distiller.csa.parameters())
    assert not any(p.requires_grad for p in distiller.assistant_head.parameters())
    before_student, before_csa = snapshot(distiller.student), snapshot(distiller.csa)
    before_head = snapshot(distiller.assistant_head)
    logs = distiller.train_step(tiny_batch(cfg), opt)
    assert any(k.startswith("assistant/") for k in logs)  # its loss is still reported
    assert not changed(before_csa, distiller.csa) and not changed(before_head, distiller.assistant_head)
    assert changed(before_student, distiller.student)
    # Only the head training is an assistant that trains; a frozen one has nothing to warm up or anchor.
    assert replace(cfg, distill={"csa": {"head_lr": 1e-4, "warmup_iterations": 5}}).assistant_trains
    for bad in ({"warmup_iterations": 5}, {"teacher_anchor": 1.0}):
        with pytest.raises(ConfigError, match="nothing in the assistant trains"):
            replace(cfg, distill={"csa": bad})
    with pytest.raises(ConfigError, match="distill.csa.lr"):
        replace(cfg, distill={"csa": {"lr": -1e-4}})


@pytest.mark.parametrize("detector", ("retinanet", "fcos"))
def test_the_teacher_anchor_pulls_the_assistant_back_to_the_teachers_own_predictions(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector}, distill={"csa": {"teacher_anchor": 1.0}})
    distiller, opt = distiller_with_optimizers(cfg)
    assert distiller.method.starts_as_teacher
    batch = tiny_batch(cfg)
    out = distiller.student_parts.forward_train(batch.student_images, batch.student_targets)
    _, teacher_maps = distiller.teacher_maps(batch.teacher_images)
    params = distiller.assistant_parameters()

    def anchor_grad_norm() -> float:
        preds = distiller.student_parts.predict(distiller.method.assistant_maps(out.fpn, teacher_maps), out.fpn_names,
                                                out.context, distiller.assistant_head)
        terms = distiller.method._teacher_anchor_losses(preds, out, teacher_maps)
        assert {"kd/cls", "kd/bbox"} <= set(terms)
        grads = torch.autograd.grad(sum(terms.values()), params, allow_unused=True)
        return float(sum(g.abs().sum() for g in grads if g is not None))

    # The assistant starts as exactly the teacher's predictions: the anchor is at its minimum and pulls nowhere...
    assert anchor_grad_norm() < 1e-5
    with torch.no_grad():  # ...and once the assistant's head has moved away, it pulls back.
        for p in distiller.assistant_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert anchor_grad_norm() > 1e-3
    logs = distiller.assistant_warmup_step(batch, opt)
    assert {"assistant/kd/cls", "assistant/kd/bbox"} <= set(logs)


@pytest.mark.parametrize("overrides", [{"csa": {"teacher_anchor": -0.5}},
                                       {"csa": {"teacher_anchor": 1.0, "keys_from": "student"}},
                                       {"csa": {"teacher_anchor": 1.0}, "pairing": "same_level"},
                                       {"csa": {"teacher_anchor": 1.0, "head": "shared"}}])
def test_a_teacher_anchor_without_the_teachers_predictions_on_the_students_anchors_is_refused(tiny_cfg, overrides):
    with pytest.raises(ConfigError, match="distill.csa.teacher_anchor"):
        replace(tiny_cfg, distill=overrides)


@pytest.mark.parametrize("detector", ("retinanet", "fcos"))
def test_an_assistant_that_adds_nothing_detects_exactly_what_the_student_does(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector}, distill={"csa": {"starts_as": "student"}})
    distiller, _ = distiller_with_optimizers(cfg)
    torch.nn.init.zeros_(distiller.csa.attention.proj.weight)  # attention output projected to zero:
    torch.nn.init.zeros_(distiller.csa.attention.proj.bias)  # the assistant's maps are the student's
    assisted = AssistedDetector(distiller).eval()
    assisted.score_thresh, assisted.detections_per_img = 0.0, 20
    batch = tiny_batch(cfg)  # the assistant gets both views the training collate makes
    images = batch.student_images
    with torch.no_grad():
        expected = distiller.student(images)
        got = assisted(images, batch.teacher_images)
    assert len(got) == len(expected) == len(images)
    for g, e, image in zip(got, expected, images):
        assert len(e["boxes"]) == 20
        torch.testing.assert_close(g["boxes"], e["boxes"])
        torch.testing.assert_close(g["scores"], e["scores"])
        assert torch.equal(g["labels"], e["labels"])
        assert g["boxes"][:, 2].max() <= image.shape[-1] and g["boxes"][:, 3].max() <= image.shape[-2]
    # Anything the attention adds changes the detections: the comparison above is not vacuous.
    torch.nn.init.normal_(distiller.csa.attention.proj.weight, std=1.0)
    with torch.no_grad():
        moved = assisted(images, batch.teacher_images)
    assert not torch.allclose(moved[0]["scores"], expected[0]["scores"])


def test_a_two_stage_assistant_is_not_run_as_a_detector(tiny_cfg):
    distiller, _ = distiller_with_optimizers(replace(tiny_cfg, model={"detector": "faster_rcnn"}))
    with pytest.raises(ValueError, match="one-stage"):
        AssistedDetector(distiller)


def test_the_no_teacher_control_reads_keys_and_values_from_the_student_alone(tiny_cfg):
    student_maps = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    teacher_a = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]  # scale-aligned: the student's grids
    teacher_b = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    with torch.no_grad():
        control, _ = distiller_with_optimizers(replace(tiny_cfg, distill={"csa": {"keys_from": "student"}}))
        scalekd, _ = distiller_with_optimizers(tiny_cfg)
        for model in (control, scalekd):  # the output projection starts at zero: give the attention a voice
            torch.nn.init.normal_(model.csa.attention.proj.weight)
        same = [torch.equal(a, b) for a, b in zip(control.method.assistant_maps(student_maps, teacher_a),
                                                  control.method.assistant_maps(student_maps, teacher_b))]
        moved = [torch.equal(a, b) for a, b in zip(scalekd.method.assistant_maps(student_maps, teacher_a),
                                                   scalekd.method.assistant_maps(student_maps, teacher_b))]
    assert all(same) and not any(moved)


@pytest.mark.parametrize("detector", ("retinanet", "fcos"))
def test_an_assistant_that_starts_as_the_teacher_predicts_the_teachers_scale_aligned_outputs(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector})  # starts_as=auto: the teacher, where it can
    distiller, _ = distiller_with_optimizers(cfg)
    batch = tiny_batch(cfg)
    with torch.no_grad():
        student_out = distiller.student_parts.forward_train(batch.student_images, batch.student_targets)
        _, teacher_maps = distiller.teacher_maps(batch.teacher_images)
        names, ctx = student_out.fpn_names, student_out.context
        od_targets = distiller.teacher_parts.predict(teacher_maps, names, ctx)  # what OD imitates
        maps = distiller.method.assistant_maps([m.detach() for m in student_out.fpn], teacher_maps)
        assistant = distiller.student_parts.predict(maps, names, ctx, distiller.assistant_head)
    assert od_targets.keys() == assistant.keys()
    for key in od_targets:
        torch.testing.assert_close(assistant[key], od_targets[key])
    # The student's own head on the same maps predicts something else: the copy is the teacher's head.
    with torch.no_grad():
        student_head = distiller.student_parts.predict(maps, names, ctx)
    assert not torch.allclose(student_head["cls_logits"], od_targets["cls_logits"])


def test_the_no_teacher_control_of_a_teacher_start_starts_as_the_student(tiny_cfg):
    cfg = replace(tiny_cfg, distill={"csa": {"starts_as": "teacher", "keys_from": "student"}})
    distiller, _ = distiller_with_optimizers(cfg)
    student_maps = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    teacher_maps = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    with torch.no_grad():
        maps = distiller.method.assistant_maps(student_maps, teacher_maps)
    assert all(torch.equal(a, s) for a, s in zip(maps, student_maps))
    head = distiller.student_parts.prediction_head().state_dict()
    assert all(torch.equal(v, head[k]) for k, v in distiller.assistant_head.state_dict().items())


def _heads_and_maps(cfg, seed=0):
    torch.manual_seed(seed)
    student, teacher = build_pair(cfg)
    maps = [torch.randn(2, cfg.model.fpn_channels, size, size) for size in (8, 4, 2)]
    return student.head, teacher.head.eval(), maps


@pytest.mark.parametrize("detector", ("retinanet", "fcos"))
@pytest.mark.parametrize("index", (0, 3, 4))
def test_crosskd_through_the_teachers_own_head_and_maps_gives_the_teachers_predictions(tiny_cfg, detector, index):
    from scalekd.distill.crosskd import cross_head_predictions

    cfg = replace(tiny_cfg, model={"detector": detector})
    _, teacher_head, maps = _heads_and_maps(cfg)
    cross, own = cross_head_predictions(teacher_head, teacher_head, maps, maps, index)
    with torch.no_grad():
        reference = teacher_head(maps)  # torchvision's own forward and layout
    assert set(cross) == set(own) == set(reference)
    for key in reference:
        assert torch.allclose(own[key], reference[key], atol=1e-6), key
        assert torch.allclose(cross[key], reference[key], atol=1e-4), key  # align_scale is the identity here


def test_crosskd_gradients_reach_the_students_lower_head_only_through_the_frozen_teacher(tiny_cfg):
    from scalekd.distill.crosskd import cross_head_predictions

    student_head, teacher_head, maps = _heads_and_maps(tiny_cfg)
    teacher_head.requires_grad_(False)
    student_maps = [m.clone().requires_grad_(True) for m in maps]
    teacher_maps = [torch.randn_like(m) for m in maps]
    cross, own = cross_head_predictions(student_head, teacher_head, student_maps, teacher_maps, 3)
    assert not own["cls_logits"].requires_grad
    (cross["cls_logits"].sum() + cross["bbox_regression"].sum()).backward()
    from scalekd.distill.crosskd import conv_blocks

    convs = [block[0] for block in conv_blocks(student_head.classification_head.conv)]
    assert len(convs) == 4 and all(c.weight.grad is not None for c in convs[:3])
    assert convs[3].weight.grad is None  # above the crossing the student's own head is not on this path
    assert student_head.classification_head.cls_logits.weight.grad is None
    assert all(m.grad is not None for m in student_maps)
    assert all(p.grad is None for p in teacher_head.parameters())


def test_crosskd_needs_a_dense_head_and_a_conv_of_the_head(tiny_cfg):
    with pytest.raises(ConfigError, match="one-stage"):
        replace(tiny_cfg, model={"detector": "faster_rcnn"}, distill={"method": "crosskd"})
    for index in (-1, 5):
        with pytest.raises(ConfigError, match="head_index"):
            replace(tiny_cfg, distill={"method": "crosskd", "crosskd": {"head_index": index}})
    cfg = replace(tiny_cfg, distill={"method": "crosskd"})
    assert cfg.loss_weights()[1:] == (1.0, 1.0)  # CrossKD's own weights unless beta/gamma are given


@pytest.mark.parametrize("detector", ("retinanet", "fcos"))
def test_scalekd_with_cross_head_terms_adds_them_at_their_weight_to_the_student_loss(tiny_cfg, detector):
    cfg = replace(tiny_cfg, model={"detector": detector}, distill={"cross_head_weight": 2.0})
    torch.manual_seed(0)
    distiller, opt = distiller_with_optimizers(cfg)
    logs = distiller.train_step(tiny_batch(cfg), opt)
    assert {"cross/cls", "cross/bbox", "kd/cls", "kd/bbox", "kd/feat"} <= set(logs)
    alpha, beta, gamma = cfg.loss_weights()
    weights = {"kd/feat": alpha, "kd/cls": beta, "kd/ctr": beta, "kd/bbox": gamma, "cross/cls": 2.0, "cross/bbox": 2.0}
    terms = {k: v for k, v in logs.items() if k.startswith(("det/", "kd/", "cross/"))}
    expected = sum(weights.get(k, 1.0) * float(v) for k, v in terms.items())
    assert float(logs["loss/total"]) == pytest.approx(expected, rel=1e-5)
    assert float(logs["cross/cls"]) > 0
    without = distiller_with_optimizers(replace(cfg, distill={"cross_head_weight": 0.0}))
    assert not any(k.startswith("cross/") for k in without[0].train_step(tiny_batch(cfg), without[1]))


@pytest.mark.parametrize("overrides, field", [
    ({"distill": {"cross_head_weight": -1.0}}, "cross_head_weight"),
    ({"distill": {"cross_head_weight": 1.0, "method": "fitnet"}}, "cross_head_weight"),
    ({"distill": {"cross_head_weight": 1.0, "method": "crosskd"}}, "cross_head_weight"),
    ({"distill": {"cross_head_weight": 1.0, "csa": {"keys_from": "student"}}}, "cross_head_weight"),
    ({"distill": {"cross_head_weight": 1.0, "pairing": "same_level"}, "model": {"student_min_level": 3}},
     "cross_head_weight"),
    ({"distill": {"cross_head_weight": 1.0}, "model": {"detector": "faster_rcnn"}}, "cross_head_weight"),
])
def test_cross_head_terms_refuse_what_they_cannot_run_on_and_the_no_teacher_control(tiny_cfg, overrides, field):
    with pytest.raises(ConfigError, match=field):
        replace(tiny_cfg, **overrides)


@pytest.mark.parametrize("overrides, weight", [
    ({}, 2.0),
    ({"distill": {"csa": {"keys_from": "student"}}}, 0.0),  # the no-teacher control: no teacher head to read
    ({"distill": {"method": "crosskd"}}, 0.0),  # CrossKD alone has its terms at beta and gamma already
    ({"distill": {"method": "od"}}, 0.0),
    ({"distill": {"pairing": "same_level"}, "model": {"student_min_level": 3}}, 0.0),
    ({"model": {"detector": "faster_rcnn"}}, 0.0),
])
def test_cross_head_weight_auto_is_twice_crosskds_only_where_the_terms_can_be_formed(tiny_cfg, overrides, weight):
    cfg = replace(tiny_cfg, distill={"cross_head_weight": "auto"})
    cfg = replace(cfg, **overrides)
    assert cfg.distill.cross_head_weight == "auto"  # recorded as asked; resolved where it is read
    assert cfg.cross_head_weight == weight


@pytest.mark.parametrize("value", ("often", float("nan"), float("inf"), True, [1.0]))
def test_cross_head_weight_refuses_what_is_neither_a_finite_weight_nor_auto(tiny_cfg, value):
    with pytest.raises(ConfigError, match="cross_head_weight"):
        replace(tiny_cfg, distill={"cross_head_weight": value})


def test_crosskd_alignment_of_a_one_cell_map_of_one_image_is_finite():
    from scalekd.distill.crosskd import align_scale

    out = align_scale(torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1))
    assert torch.isfinite(out).all()
