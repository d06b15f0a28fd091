"""Validation of a built config: every field checked against what the code supports, section by section; the
first bad one raises ConfigError naming the field, the value and what it may be. ``scalekd.config`` runs it on
every config it builds, so code below that edge trusts the config.
"""

from __future__ import annotations

from typing import Any

from scalekd.config_schema import (ASSIGNERS, BACKBONES, BOX_LOSSES, DETECTORS, MAX_FPN_CHANNELS, PAIRINGS, Config,
                                   ConfigError, DataConfig, EvalConfig, ExperimentalConfig, ModelConfig,
                                   ScalingConfig, TrainConfig, _method, _method_names)
from scalekd.data.annotations import SPLIT_RULE, is_split_name

def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(path, value, allowed)


def validate(cfg: Config) -> None:
    """Every field checked against what the code supports, section by section; the first bad one raises
    ConfigError naming the field, the value and what it may be."""
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_distill(cfg)
    _validate_assistant(cfg)
    _validate_experimental(cfg.experimental, cfg.model.detector)
    for path, value, allowed in _method(cfg.distill.method).problems(cfg):  # what the method itself cannot run
        raise ConfigError(path, value, allowed)
    _validate_train(cfg.train)
    _validate_scaling(cfg.scaling)
    _validate_eval(cfg.eval)


def _validate_data(d: DataConfig) -> None:
    _check(32 <= d.student_size <= 8192 and d.student_size % 32 == 0, "data.student_size", d.student_size,
           "a multiple of 32 (the FPN's coarsest stride) from 32 to 8192")
    _check(1.0 <= d.teacher_scale <= 8.0 and (d.student_size * d.teacher_scale) % 32 == 0,
           "data.teacher_scale", d.teacher_scale,
           ">= 1 and such that student_size x teacher_scale is a multiple of 32 (the paper uses 2)")
    _check(float(32 * d.teacher_scale).is_integer(), "data.teacher_scale", d.teacher_scale,
           "such that 32 x teacher_scale is an integer (the teacher pads to it, for exact cross-resolution grids)")
    _check(d.max_size_ratio >= 1.0, "data.max_size_ratio", d.max_size_ratio, ">= 1")
    _check(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", d.hflip_prob, "a probability in [0, 1]")
    _check(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, ">= 0")
    _check(0.0 <= d.teacher_holdout < 1.0, "data.teacher_holdout", d.teacher_holdout,
           "a share in [0, 1): 0 for one set of images for all stages, 0.5 for halves (the students need some)")
    _check(bool(d.root), "data.root", d.root, "a local folder or s3://bucket/prefix")
    for field in ("train_split", "val_split"):
        _check(is_split_name(getattr(d, field)), f"data.{field}", getattr(d, field), SPLIT_RULE)


def _validate_model(m: ModelConfig) -> None:
    _check(m.detector in DETECTORS, "model.detector", m.detector, f"one of {DETECTORS}")
    _check(m.student_backbone in BACKBONES, "model.student_backbone", m.student_backbone, f"one of {BACKBONES}")
    _check(m.teacher_backbone in BACKBONES, "model.teacher_backbone", m.teacher_backbone, f"one of {BACKBONES}")
    _check(8 <= m.fpn_channels <= MAX_FPN_CHANNELS and m.fpn_channels % 8 == 0, "model.fpn_channels",
           m.fpn_channels, f"a multiple of 8 from 8 to {MAX_FPN_CHANNELS}")
    # torchvision's FCOS head normalises with GroupNorm(32, channels): other widths fail deep inside its constructor.
    _check(m.detector != "fcos" or m.fpn_channels % 32 == 0, "model.fpn_channels", m.fpn_channels,
           "a multiple of 32 with model.detector=fcos (its head's GroupNorm has 32 groups)")
    _check(m.anchor_scale > 0, "model.anchor_scale", m.anchor_scale, "> 0 (anchor side / stride)")
    _check(m.student_min_level in (2, 3), "model.student_min_level", m.student_min_level,
           "2 (P2-P6, for tiny objects) or 3 (P3-P7); one-stage detectors only (Faster R-CNN runs P2-P6)")
    _check(m.num_classes >= 0, "model.num_classes", m.num_classes, ">= 0 (0 = from the dataset)")


def _validate_distill(cfg: Config) -> None:
    k, m = cfg.distill, cfg.model
    _check(k.method in _method_names(), "distill.method", k.method, f"one of {_method_names()}")
    for name in ("alpha", "beta", "gamma"):
        v = getattr(k, name)
        _check(v is None or v >= 0, f"distill.{name}", v, "a non-negative number (or null for the paper's)")
    _check(k.recipe in ("aligned", "paper"), "distill.recipe", k.recipe, "aligned (our defaults) or paper")
    _check(k.pairing in PAIRINGS, "distill.pairing", k.pairing, f"one of {PAIRINGS}")
    _check(not (k.pairing == "same_level" and cfg.one_stage and m.student_min_level == 2), "distill.pairing",
           k.pairing, "scale_aligned when model.student_min_level=2 (the teacher has no P2 to pair P2 with)")
    _check(k.kd_ramp_iterations >= 0, "distill.kd_ramp_iterations", k.kd_ramp_iterations,
           ">= 0 (student iterations over which alpha, beta and gamma rise from 0; 0 = none)")
    _check(k.temperature > 0, "distill.temperature", k.temperature, "> 0")
    _check(k.background_weight > 0, "distill.background_weight", k.background_weight, "> 0")
    _check(k.margin >= 0, "distill.margin", k.margin, ">= 0")
    _check(len(k.sdf.dilations) >= 1 and all(x >= 1 for x in k.sdf.dilations), "distill.sdf.dilations",
           k.sdf.dilations, "a non-empty list of dilation rates >= 1 (paper: [1, 2, 3])")
    _check(k.sdf.embed_channels >= 1, "distill.sdf.embed_channels", k.sdf.embed_channels, ">= 1")
    _check(k.sdf.bottleneck_ratio >= 1, "distill.sdf.bottleneck_ratio", k.sdf.bottleneck_ratio, ">= 1")
    _check(k.crosskd.head_index in range(5), "distill.crosskd.head_index", k.crosskd.head_index,
           "0-4 (the head's convs below the crossing; 0: the FPN maps themselves)")
    _check(k.crosskd.focal_beta >= 0, "distill.crosskd.focal_beta", k.crosskd.focal_beta, ">= 0")
    _check(k.cross_head_weight == "auto" or k.cross_head_weight >= 0, "distill.cross_head_weight",
           k.cross_head_weight, ">= 0 (0: no cross-head terms) or auto")
    _check(k.cross_head_weight in ("auto", 0) or cfg.cross_head_possible, "distill.cross_head_weight",
           k.cross_head_weight, "0 or auto unless distill.method=scalekd (distill.method=crosskd is CrossKD alone) on "
           "a one-stage detector with distill.pairing=scale_aligned and distill.csa.keys_from=teacher (the no-teacher "
           "control must not see the teacher's head)")


def _validate_assistant(cfg: Config) -> None:
    m, c = cfg.model, cfg.distill.csa
    _check(c.attention in ("multiscale", "plain"), "distill.csa.attention", c.attention, "multiscale or plain")
    _check(c.head in ("shared", "own"), "distill.csa.head", c.head, "shared or own")
    _check(len(c.rates) >= 1 and all(r >= 1 for r in c.rates), "distill.csa.rates", c.rates,
           "a non-empty list of pooling rates >= 1")
    _check(c.heads >= 1 and c.heads % len(c.rates) == 0, "distill.csa.heads", c.heads,
           f"a positive multiple of the number of rates ({len(c.rates)})")
    _check(m.fpn_channels % c.heads == 0, "distill.csa.heads", c.heads,
           f"must divide model.fpn_channels ({m.fpn_channels})")
    _check(c.lr >= 0, "distill.csa.lr", c.lr, ">= 0 (0: the attention frozen)")
    _check(c.head_lr is None or c.head_lr >= 0, "distill.csa.head_lr", c.head_lr,
           ">= 0 (0: the assistant's own head frozen), or null for distill.csa.lr")
    _check(c.weight_decay >= 0, "distill.csa.weight_decay", c.weight_decay, ">= 0")
    _check(c.keys_from in ("teacher", "student"), "distill.csa.keys_from", c.keys_from,
           "teacher (the method) or student (a control without the teacher)")
    _check(c.locality in ("distance_bias", "none"), "distill.csa.locality", c.locality, "distance_bias or none")
    _check(c.starts_as in ("auto", "student", "teacher"), "distill.csa.starts_as", c.starts_as,
           "auto, student or teacher")
    _check(c.starts_as != "teacher" or cfg.teacher_start_possible, "distill.csa.starts_as", c.starts_as,
           "student, or teacher with distill.pairing=scale_aligned, a one-stage detector, distill.csa.head=own and "
           "data.teacher_scale=2 (the teacher's P_{l+1} head then predicts on the student's anchors)")
    _check(c.teacher_anchor >= 0, "distill.csa.teacher_anchor", c.teacher_anchor, ">= 0 (0: ground truth alone)")
    _check(c.teacher_anchor == 0 or (cfg.teacher_start_possible and c.keys_from == "teacher"),
           "distill.csa.teacher_anchor", c.teacher_anchor,
           "0 unless distill.csa.keys_from=teacher, distill.pairing=scale_aligned, a one-stage detector, "
           "distill.csa.head=own and data.teacher_scale=2 (the teacher's own predictions on the student's anchors)")
    _check(c.warmup_iterations >= 0, "distill.csa.warmup_iterations", c.warmup_iterations, ">= 0 (0: none)")


def _validate_experimental(e: ExperimentalConfig, detector: str) -> None:
    _check(e.assigner in ASSIGNERS, "experimental.assigner", e.assigner, f"one of {ASSIGNERS}")
    _check(e.assigner == "max_iou" or detector == "retinanet", "experimental.assigner", e.assigner,
           "max_iou unless model.detector=retinanet (FCOS and Faster R-CNN keep their own assignment)")
    _check(e.atss_topk >= 1, "experimental.atss_topk", e.atss_topk, ">= 1 (candidate cells per level and object)")
    _check(0.0 < e.positive_iou < 1.0, "experimental.positive_iou", e.positive_iou, "an IoU in (0, 1)")
    _check(0.0 < e.negative_iou <= e.positive_iou, "experimental.negative_iou", e.negative_iou,
           f"an IoU in (0, experimental.positive_iou = {e.positive_iou}]")
    default_thresholds = (e.positive_iou, e.negative_iou) == (0.5, 0.4)
    _check(default_thresholds or (detector == "retinanet" and e.assigner == "max_iou"), "experimental.positive_iou",
           f"{e.positive_iou} / {e.negative_iou}", "0.5 / 0.4 unless model.detector=retinanet with "
           "experimental.assigner=max_iou (ATSS sets its own threshold; FCOS and Faster R-CNN keep their assignment)")
    _check(e.box_loss in BOX_LOSSES, "experimental.box_loss", e.box_loss, f"one of {BOX_LOSSES}")
    _check(e.box_loss == "l1" or detector == "retinanet", "experimental.box_loss", e.box_loss,
           "l1 unless model.detector=retinanet (FCOS trains with GIoU, Faster R-CNN with smooth L1, their own)")
    _check(e.teacher_sdf in ("shared", "frozen"), "experimental.teacher_sdf", e.teacher_sdf, "shared or frozen")
    _check(e.csa_positional in ("sine", "none"), "experimental.csa_positional", e.csa_positional, "sine or none")
    _check(e.bbox_loss in ("bounded", "l2", "smooth_l1"), "experimental.bbox_loss", e.bbox_loss,
           "one of bounded, l2, smooth_l1")


def _validate_train(t: TrainConfig) -> None:
    for name in ("teacher_iterations", "warmup_iterations", "distill_iterations", "batch_size",
                 "checkpoint_interval", "log_interval"):
        _check(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "an integer >= 1")
    for name in ("freeze_backbone_iterations", "lr_warmup_iterations", "seed"):
        _check(getattr(t, name) >= 0, f"train.{name}", getattr(t, name), "an integer >= 0")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _check(all(0 < x < 1 for x in t.lr_steps) and list(t.lr_steps) == sorted(t.lr_steps), "train.lr_steps",
           t.lr_steps, "increasing fractions of the stage in (0, 1)")
    _check(0 < t.lr_gamma <= 1, "train.lr_gamma", t.lr_gamma, "in (0, 1]")
    _check(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "> 0")


def _validate_scaling(s: ScalingConfig) -> None:
    _check(s.workers >= 1, "scaling.workers", s.workers, "an integer >= 1")
    _check(0 <= s.min_workers <= s.workers, "scaling.min_workers", s.min_workers,
           f"an integer from 0 (a fixed group) to scaling.workers ({s.workers})")
    _check(s.cpus_per_worker >= 1, "scaling.cpus_per_worker", s.cpus_per_worker, ">= 1")
    _check(s.max_failures >= 0, "scaling.max_failures", s.max_failures, ">= 0")
    _check("@" not in s.ray_address.split("//", 1)[-1].split("/", 1)[0], "scaling.ray_address", s.ray_address,
           "http://HEAD:8265 without credentials; token authentication reads RAY_AUTH_TOKEN (docs/cluster.md)")


def _validate_eval(e: EvalConfig) -> None:
    _check(len(e.max_detections) >= 1 and all(x >= 1 for x in e.max_detections)
           and list(e.max_detections) == sorted(e.max_detections), "eval.max_detections",
           e.max_detections, "increasing positive integers, e.g. [1, 10, 100]")
    _check(not e.size_band_edges or (len(e.size_band_edges) >= 2 and e.size_band_edges[0] >= 0 and
           list(e.size_band_edges) == sorted(set(e.size_band_edges))), "eval.size_band_edges", e.size_band_edges,
           "increasing object sides in px, at least two (e.g. [0, 8, 16, 32]), or [] for no bands")
    _check(0 <= e.score_threshold < 1, "eval.score_threshold", e.score_threshold, "in [0, 1)")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
