"""Cross-resolution geometry: anchor coverage, exact 2x grids, scale-aligned pairing, PKD, the
assistant's evaluation views and the still student's BatchNorm statistics."""

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from scalekd.config import ConfigError, load_config, replace
from scalekd.data.coverage import covered
from scalekd.data.transforms import DualResolutionCollate
from scalekd.distill.losses import pkd_loss
from scalekd.eval.predict import predict
from scalekd.geometry import DetectorSpec, pair_teacher_maps, student_spec, teacher_spec
from scalekd.models.detectors import build_detector
from scalekd.models.parts import DetectorParts, atss_match
from scalekd.train.stage import StageRequest
from tests.helpers import build_pair, distiller_with_optimizers, tiny_batch, write_coco

P2_RETINANET = DetectorSpec("retinanet", "resnet18", 2, 16, 128, 213, anchor_scale=1.5, min_level=2)


def test_coverage_counts_a_box_an_anchor_fits_and_refuses_one_no_anchor_can_reach():
    # Anchors 1.5 x 4 = 6 px (x 2^(k/3), 3 aspect ratios) centred on multiples of 4 (torchvision's layout).
    on_grid = torch.tensor([[61.0, 61.0, 67.0, 67.0]])  # a 6 px box centred on an anchor centre: IoU 1
    off_grid_tiny = torch.tensor([[62.0, 62.0, 65.0, 65.0]])  # 3 px, 1.5 px off: best IoU 0.25
    assert covered(P2_RETINANET, on_grid, 128, 128).tolist() == [True]
    assert covered(P2_RETINANET, off_grid_tiny, 128, 128).tolist() == [False]
    p3 = DetectorSpec("retinanet", "resnet18", 2, 16, 128, 213, anchor_scale=2.0, min_level=3)
    eight_px = torch.tensor([[60.0, 60.0, 68.0, 68.0]])  # P3's smallest anchor is 16 px: IoU 0.25
    assert covered(p3, eight_px, 128, 128).tolist() == [False]
    assert covered(P2_RETINANET, eight_px, 128, 128).tolist() == [True]


def test_atss_covers_a_tiny_box_between_anchor_centres_but_not_one_with_no_anchor_centre_inside():
    off_grid_tiny = torch.tensor([[62.0, 62.0, 65.0, 65.0]])  # best IoU 0.25, but the anchor centre (64, 64) is inside
    no_centre_inside = torch.tensor([[64.5, 64.5, 67.5, 67.5]])  # strictly between the centres 64 and 68
    assert covered(P2_RETINANET, off_grid_tiny, 128, 128, "atss").tolist() == [True]
    assert covered(P2_RETINANET, no_centre_inside, 128, 128, "atss").tolist() == [False]


def test_atss_threshold_is_mean_plus_std_per_object_and_a_contested_anchor_goes_to_the_better_overlap():
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]])
    exact = torch.tensor([[0.0, 0, 10, 10]])  # IoUs 1, 0.14, 0: threshold 0.92, only anchor 0
    shifted = torch.tensor([[4.0, 4, 14, 14]])  # IoUs 0.22, 0.68, 0: only anchor 1
    near_exact = torch.tensor([[1.0, 1, 11, 11]])  # IoUs 0.68, 0.22, 0: wants anchor 0, which overlaps exact more
    assert atss_match(exact, anchors, [3], topk_cells=3).tolist() == [0, -1, -1]
    assert atss_match(shifted, anchors, [3], topk_cells=3).tolist() == [-1, 0, -1]
    assert atss_match(torch.cat([exact, shifted]), anchors, [3], topk_cells=3).tolist() == [0, 1, -1]
    assert atss_match(torch.cat([near_exact, exact]), anchors, [3], topk_cells=3).tolist() == [1, -1, -1]
    no_centre_inside = torch.tensor([[11.0, 11, 14, 14]])  # best IoU 0.09 with anchor 1, whose centre is outside
    assert atss_match(no_centre_inside, anchors, [3], topk_cells=3, low_quality=False).tolist() == [-1, -1, -1]
    # Its best anchor, as torchvision's matcher keeps one.
    assert atss_match(no_centre_inside, anchors, [3], topk_cells=3).tolist() == [-1, 0, -1]


def test_atss_with_one_candidate_cell_per_level_keeps_fewer_low_overlap_positives_and_the_config_passes_k_on():
    # A 12 px box at stride 4 covers nine cells: with nine candidate cells each of their nine anchors is a candidate
    # and the threshold (mean + std over 81) is low; with one, only the nearest cell's anchors compete.
    from scalekd.data.coverage import image_anchors

    anchors, cells = image_anchors(P2_RETINANET, 128, 128)
    box = torch.tensor([[58.0, 58.0, 70.0, 70.0]])
    wide, narrow = (atss_match(box, anchors, cells, k, low_quality=False) for k in (9, 1))
    assert 0 < (narrow == 0).sum() < (wide == 0).sum()
    ious = box_iou(box, anchors)[0]
    assert ious[narrow == 0].min() > ious[wide == 0].min()
    assert covered(P2_RETINANET, box, 128, 128, "atss", 1).tolist() == [True]


def test_atss_topk_reaches_the_matcher_and_is_validated(tiny_cfg):
    cfg = replace(tiny_cfg, model={"student_min_level": 2}, experimental={"assigner": "atss", "atss_topk": 1})
    distiller, _ = distiller_with_optimizers(cfg)
    assert distiller.student_parts.atss_topk == 1
    with pytest.raises(ConfigError, match="experimental.atss_topk"):
        replace(tiny_cfg, experimental={"assigner": "atss", "atss_topk": 0})


def test_a_retinanet_trained_with_atss_gives_every_box_a_positive_and_a_finite_loss(tiny_cfg):
    cfg = replace(tiny_cfg, model={"student_min_level": 2}, experimental={"assigner": "atss"})
    distiller, _ = distiller_with_optimizers(cfg)
    assert distiller.student_parts.assigner == "atss"
    batch = tiny_batch(cfg)
    out = distiller.student_parts.forward_train(batch.student_images, batch.student_targets)
    for matched, target in zip(out.context.matched_idxs, out.context.targets):
        assert set(matched[matched >= 0].tolist()) == set(range(len(target["boxes"])))
    assert all(torch.isfinite(v) for v in out.losses.values())
    with pytest.raises(ConfigError, match="experimental.assigner"):
        replace(tiny_cfg, model={"detector": "fcos"}, experimental={"assigner": "atss"})


def test_lower_iou_thresholds_cover_a_tiny_box_between_anchor_centres_and_reach_the_matcher(tiny_cfg):
    # A 4 px box 1 px off the nearest anchor centre (64, 64) on both axes: its best IoU, with the 6 px anchor there,
    # is 16 / 36 = 0.44.
    between = torch.tensor([[63.0, 63.0, 67.0, 67.0]])
    lowered = DetectorSpec("retinanet", "resnet18", 2, 16, 128, 213, anchor_scale=1.5, min_level=2,
                           positive_iou=0.4, negative_iou=0.3)
    assert box_iou(between, image_anchors_of(P2_RETINANET)).max().item() == pytest.approx(16 / 36)
    assert covered(P2_RETINANET, between, 128, 128).tolist() == [False]
    assert covered(lowered, between, 128, 128).tolist() == [True]
    cfg = replace(tiny_cfg, model={"student_min_level": 2}, experimental={"positive_iou": 0.4, "negative_iou": 0.3})
    distiller, _ = distiller_with_optimizers(cfg)
    for model in (distiller.student, distiller.teacher):
        matcher = model.proposal_matcher
        assert (matcher.high_threshold, matcher.low_threshold) == (0.4, 0.3)
    assert (student_spec(cfg, 2).positive_iou, teacher_spec(cfg, 2).negative_iou) == (0.4, 0.3)


@pytest.mark.parametrize("settings, field", [
    ({"positive_iou": 1.0}, "experimental.positive_iou"), ({"positive_iou": 0.0}, "experimental.positive_iou"),
    ({"positive_iou": 0.4, "negative_iou": 0.5}, "experimental.negative_iou"),
    ({"negative_iou": 0.0}, "experimental.negative_iou"), ({"negative_iou": -0.1}, "experimental.negative_iou"),
    ({"detector": "fcos", "positive_iou": 0.4}, "experimental.positive_iou"),
    ({"assigner": "atss", "negative_iou": 0.3}, "experimental.positive_iou")])
def test_iou_thresholds_out_of_range_or_for_a_detector_that_ignores_them_are_refused(tiny_cfg, settings, field):
    experimental = dict(settings)
    model = {"detector": experimental.pop("detector")} if "detector" in experimental else {}
    with pytest.raises(ConfigError, match=field):
        replace(tiny_cfg, model=model, experimental=experimental)


def image_anchors_of(spec: DetectorSpec) -> torch.Tensor:
    from scalekd.data.coverage import image_anchors

    return image_anchors(spec, 128, 128)[0]


def test_data_stats_reports_coverage_for_the_student_and_the_teacher_at_2x(synth_root, capsys):
    from scalekd.cli import main

    code = main(["data", "stats", f"{synth_root}/annotations/instances_val.json", "--preset", "tiny",
                 "--set", "model.student_min_level=2"])
    out = capsys.readouterr().out
    assert code == 0 and "anchor coverage" in out
    assert "student" in out and "teacher" in out and "% of" in out


def _one_image_annotations(path, boxes_xywh):
    return write_coco(path.parent, [{"id": 1, "file_name": "a.png", "height": 128, "width": 128}],
                      [{"id": i, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3]}
                       for i, box in enumerate(boxes_xywh, 1)], [{"id": 1, "name": "thing"}], path.name)


def test_data_stats_pools_the_small_bands_and_warns_with_the_options_when_the_student_covers_under_90pct(tmp_path):
    from scalekd.data.stats import coverage_for_config, dataset_stats, format_stats

    # The student sees the 128 px image as is: P2 anchors of 6 px centred on multiples of 4 (as P2_RETINANET).
    cfg = load_config(preset="tiny", overrides=["data.student_size=128", "model.student_min_level=2",
                                                "model.anchor_scale=1.5"])
    on_grid, off_grid_tiny = [61, 61, 6, 6], [62, 62, 3, 3]  # covered, and best IoU 0.25 (not covered)
    half = _one_image_annotations(tmp_path / "half.json", [on_grid, off_grid_tiny])
    cov = coverage_for_config(half, cfg)
    assert cov["small_objects"]["student"] == {"objects": 2, "covered": 1, "covered_pct": 50.0}
    text = format_stats({**dataset_stats(half), "anchor_coverage": cov}, half)
    assert "all under 32 px 50.0%" in text
    warning = [line for line in text.splitlines() if "warning" in line]
    assert len(warning) == 1 and "50.0% of its 2 objects under 32 px" in warning[0]
    assert "model.detector=fcos" in warning[0] and "experimental.assigner=atss" in warning[0]
    assert "student_min_level" not in warning[0]  # already P2
    full = _one_image_annotations(tmp_path / "full.json", [on_grid])
    text = format_stats({**dataset_stats(full), "anchor_coverage": coverage_for_config(full, cfg)}, full)
    assert "all under 32 px 100.0%" in text and "warning" not in text


@pytest.mark.parametrize("height,width", [(97, 171), (128, 211), (101, 101)])
def test_both_views_pad_to_exactly_2x_and_scale_aligned_grids_match(tiny_cfg, height, width):
    cfg = replace(tiny_cfg, model={"student_min_level": 2})
    student, teacher = build_pair(cfg)
    image = torch.rand(3, height, width)
    batch = DualResolutionCollate(64, 2.0, cfg.data.max_size_ratio)([(image, {"boxes": torch.zeros(0, 4)})])
    s_list, _ = student.transform(batch.student_images)
    t_list, _ = teacher.transform(batch.teacher_images)
    assert t_list.tensors.shape[-2:] == tuple(2 * x for x in s_list.tensors.shape[-2:])
    with torch.no_grad():
        s_maps = list(DetectorParts(student.eval()).features(batch.student_images)[3].values())
        t_maps = list(DetectorParts(teacher.eval()).features(batch.teacher_images)[3].values())
    paired = pair_teacher_maps(t_maps, 5, 2, 3, "scale_aligned")
    assert [m.shape[-2:] for m in paired] == [m.shape[-2:] for m in s_maps]


def test_scale_aligned_teacher_anchors_are_the_students_anchors_in_student_pixels(tiny_cfg):
    """A box lands on the same cells: the 2x teacher's P_{l+1} anchors, halved, are the student's P_l anchors."""
    cfg = replace(tiny_cfg, model={"student_min_level": 2, "anchor_scale": 1.5})
    student = build_detector(student_spec(cfg, 4))
    teacher = build_detector(teacher_spec(cfg, 4))
    s_grid = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # P2-P6 of a 64 x 96 canvas
    t_grid = s_grid  # the teacher's P3-P7 of its 128 x 192 canvas
    s_anchors = student.anchor_generator(ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)]),
                                         [torch.zeros(1, 1, *g) for g in s_grid])[0]
    t_anchors = teacher.anchor_generator(ImageList(torch.zeros(1, 3, 128, 192), [(128, 192)]),
                                         [torch.zeros(1, 1, *g) for g in t_grid])[0]
    # Up to torchvision's rounding of each base anchor to whole pixels (in each model's own pixels).
    torch.testing.assert_close(t_anchors / 2, s_anchors, atol=0.5, rtol=0)
    s_centres, t_centres = (s_anchors[:, :2] + s_anchors[:, 2:]) / 2, (t_anchors[:, :2] + t_anchors[:, 2:]) / 4
    torch.testing.assert_close(t_centres, s_centres, atol=0.25, rtol=0)


def test_pairing_extends_the_teachers_pyramid_by_max_pooling_and_same_level_keeps_levels():
    maps = [torch.randn(1, 4, 2 ** (6 - i), 2 ** (6 - i)) for i in range(5)]  # P3-P7 of a P3 teacher
    aligned = pair_teacher_maps(maps, 5, 3, 3, "scale_aligned")  # student P3-P7 <- teacher P4-P7, pooled P7
    assert all(a is m for a, m in zip(aligned[:4], maps[1:]))
    torch.testing.assert_close(aligned[4], maps[4][..., ::2, ::2])
    assert pair_teacher_maps(maps, 5, 3, 3, "same_level") == maps
    with pytest.raises(ValueError, match="no teacher level"):
        pair_teacher_maps(maps, 5, 2, 3, "same_level")


def test_same_level_pairing_with_a_p2_student_is_refused_and_the_paper_recipe_keeps_alignment():
    with pytest.raises(ConfigError, match="distill.pairing"):
        load_config(preset="bench", overrides=["distill.pairing=same_level"])
    paper = load_config(preset="bench", overrides=["distill.recipe=paper"])
    assert paper.distill.pairing == "scale_aligned" and paper.distill.csa.head == "shared"
    assert paper.distill.csa.locality == "none" and paper.distill.csa.warmup_iterations == 0
    # CrossKD's cross-head terms (the default's, not the paper's) stay off in the paper's reading, even where its
    # P2-P6 student keeps the scale-aligned pairing they need.
    assert load_config(preset="bench").cross_head_weight == 2.0 and paper.cross_head_weight == 0.0
    literal = load_config(overrides=["distill.recipe=paper"])  # a P3-P7 student: the paper's every setting
    assert literal.distill.pairing == "same_level" and literal.distill.csa.rates == (2, 4)
    assert load_config(overrides=["distill.recipe=paper", "distill.csa.head=own"]).distill.csa.head == "own"


def test_pkd_by_hand_zero_up_to_a_positive_affine_map_per_channel():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, 5)
    scale, shift = torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1), torch.tensor([1.0, -4.0, 0.0]).view(1, 3, 1, 1)
    assert pkd_loss([s], [s * scale + shift]).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 3, 5, 5)
    norm = [(x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), unbiased=False, keepdim=True) for x in (s, t)]
    by_hand = ((norm[0] - norm[1]) ** 2).mean() / 2
    assert pkd_loss([s, s], [t, t]).item() == pytest.approx(2 * by_hand.item(), rel=1e-4)
    # Anti-correlated maps are as far apart as it gets: 1 - (-1) = 2 per channel, / 2.
    assert pkd_loss([s], [-s]).item() == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("method", ["pkd", "od"])
def test_baselines_train_on_scale_aligned_maps(tiny_cfg, method):
    cfg = replace(tiny_cfg, model={"student_min_level": 2}, distill={"method": method})
    distiller, opt = distiller_with_optimizers(cfg)
    logs = distiller.train_step(tiny_batch(cfg), opt)
    assert ("kd/feat" in logs) == (method == "pkd") and ("kd/cls" in logs) == (method == "od")
    assert all(torch.isfinite(v) for v in logs.values())


def test_the_assistants_evaluation_gets_the_training_collates_two_views(synth_root):
    from scalekd.data.coco import dataset_from_root

    dataset = dataset_from_root(synth_root, "val")
    seen = []

    class Recorder(torch.nn.Module):
        teacher_scale = 2.0

        def forward(self, student_images, teacher_images):
            seen.append((student_images, teacher_images))
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in student_images]

    predict(Recorder(), dataset, 64, 1.667, batch_size=2)
    expected = DualResolutionCollate(64, 2.0, 1.667)([dataset[0], dataset[1]])
    for got, want in zip(seen[0][0] + seen[0][1], expected.student_images + expected.teacher_images):
        assert torch.equal(got, want)


def test_batchnorm_statistics_stay_still_during_the_assistants_warmup(tiny_cfg):
    distiller, opt = distiller_with_optimizers(tiny_cfg)
    before = {k: v.clone() for k, v in distiller.student.named_buffers() if "running" in k}
    distiller.assistant_warmup_step(tiny_batch(tiny_cfg), opt)
    after = dict(distiller.student.named_buffers())
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert distiller.student.training  # back in train mode for the student's own steps
    distiller.train_step(tiny_batch(tiny_cfg), opt)
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # ... where they do move: not vacuous


def test_the_distance_bias_starts_the_attention_on_the_querys_own_cell():
    from scalekd.distill.csa import CrossScaleAttention

    attention = CrossScaleAttention(16, heads=2, rates=(1, 2), locality="distance_bias", zero_init_output=True)
    bias = attention.distance_bias(0, 4, 4, 4, 4, torch.float32)[0]  # rate 1: same grid
    assert bias.diagonal().abs().max() == 0 and (bias.argmax(dim=1) == torch.arange(16)).all()
    student = torch.randn(1, 16, 4, 4)
    assert torch.equal(attention(student, torch.randn(1, 16, 4, 4)), student)  # zero output projection


def test_teacher_ablations_keep_shapes_and_change_what_they_say(tiny_cfg):
    from scalekd.distill.assisted import ablate_maps, footprint_attention

    maps = [torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)]
    permuted = ablate_maps(maps, "permuted")[0]
    assert permuted.shape == maps[0].shape and not torch.equal(permuted, maps[0])
    assert torch.equal(permuted.flatten(2).sort(-1).values, maps[0].flatten(2).sort(-1).values)  # same cells
    assert torch.equal(ablate_maps(maps, "other_image")[0][0], maps[0][1])
    assert ablate_maps(maps, "zeroed")[0].abs().sum() == 0
    assert ablate_maps(maps, "intact") is maps
    distiller, _ = distiller_with_optimizers(replace(tiny_cfg, model={"student_min_level": 2}))
    batch = tiny_batch(tiny_cfg)
    ratios = footprint_attention(distiller.eval(), batch.student_images, batch.teacher_images)
    assert len(ratios) == len(tiny_cfg.distill.csa.rates) and all(r > 1.0 for r in ratios)  # the bias localises


@pytest.mark.integration
def test_the_assigner_and_the_box_loss_reach_the_teacher_and_warmup_stages(tiny_cfg):
    from scalekd.train.stage import build_stage
    from scalekd.train.loop import detection_step

    cfg = replace(tiny_cfg, model={"student_min_level": 2}, experimental={"assigner": "atss", "box_loss": "giou"})
    batch = tiny_batch(cfg)
    for stage_name in ("teacher", "warmup"):
        request = StageRequest(stage_name, cfg.to_dict(), cfg.data.root, "unused")
        stage = build_stage(request, cfg, 4, torch.device("cpu"), 1)
        assert stage.parts.assigner == "atss" and stage.model.head.regression_head._loss_type == "giou"
    # The warm-up step's loss is the ATSS + GIoU loss of the same forward, not torchvision's max-IoU + L1 one.
    head = stage.model.head.regression_head
    head._loss_type = "l1"
    other = DetectorParts(stage.model).forward_train(batch.student_images, batch.student_targets).losses
    head._loss_type = "giou"
    values = detection_step(stage.parts, batch.student_images, batch.student_targets, stage.opt, None)
    assert float(values["det/bbox_regression"]) != pytest.approx(float(other["bbox_regression"].detach()), rel=1e-3)
    assert all(torch.isfinite(v) for v in values.values())
    with pytest.raises(ConfigError, match="experimental.box_loss"):
        replace(tiny_cfg, model={"detector": "fcos"}, experimental={"box_loss": "giou"})
    with pytest.raises(ConfigError, match="experimental.box_loss"):
        replace(tiny_cfg, experimental={"box_loss": "smooth"})
