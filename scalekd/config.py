"""One typed configuration for every stage, loaded from YAML and validated once, at the edge.

Errors name the dotted field, the bad value and what is allowed. Code below the edge trusts the config.
The same plain dict (``to_dict``) is Ray's ``train_loop_config`` and the base of Tune's search space.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

log = logging.getLogger(__name__)

DETECTORS = ("retinanet", "fcos", "faster_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
PAIRINGS = ("scale_aligned", "same_level")
ASSIGNERS = ("max_iou", "atss")  # RetinaNet's anchor assignment (scalekd.models.parts.DetectorParts.match)
BOX_LOSSES = ("l1", "giou")  # RetinaNet's box regression loss (torchvision's _box_loss)
ONE_STAGE = ("retinanet", "fcos")
MAX_FPN_CHANNELS = 2048  # 8x torchvision's 256: beyond it a model is a typo that would exhaust memory, not a design
# Paper, section 4.1: loss weights (alpha, beta, gamma) per detector family.
PAPER_WEIGHTS = {"one_stage": (0.01, 0.2, 0.05), "two_stage": (0.07, 0.5, 0.2)}


class _ConfigLoader(yaml.SafeLoader):
    """YAML as people write configs: ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``), a key given twice in one
    mapping is an error instead of silently keeping the last, and merge keys (``<<: *base``) work."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" merges; the mapping's own keys then override the merged ones
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str):
    """YAML through the config loader (numbers in exponent form, duplicate keys refused)."""
    return yaml.load(text, Loader=_ConfigLoader)


class ConfigError(ValueError):
    """A config value is invalid; the message names the dotted field."""

    def __init__(self, path: str, value: Any, allowed: str):
        from scalekd.storage import redact

        self.path, self.value, self.allowed = path, value, allowed
        shown = redact(value) if isinstance(value, str) else value  # a rejected URL may carry credentials
        super().__init__(f"config field '{path}' = {shown!r} is invalid: {allowed}")


@dataclass(frozen=True)
class DataConfig:
    root: str = "runs/data/synth"  # local folder or s3://bucket/prefix with annotations/ and images/
    train_split: str = "train"  # annotations/instances_<split>.json the stages train on
    val_split: str = "val"  # the split evaluation and Ray Tune read
    student_size: int = 128  # student's short side in px; the teacher sees teacher_scale x this
    teacher_scale: float = 2.0  # the teacher's input size over the student's (the paper: 2)
    max_size_ratio: float = 1.667  # long side cap = ratio x short side (torchvision's 1333/800)
    hflip_prob: float = 0.5  # horizontal flip probability, the same flip for both resolutions
    # Share of the training images, by source image, that only the teacher trains on; the warm-up and the
    # distillation train on the rest (scalekd/data/holdout.py: a teacher that learnt the students' images by heart
    # has little to teach on them). 0, the paper's reading: every stage trains on every image.
    teacher_holdout: float = 0.0
    loader_workers: int = 0  # DataLoader worker processes (0: in the training process)
    cache_dir: str = ""  # local cache for s3:// reads ("" = ~/.cache/scalekd)


@dataclass(frozen=True)
class ModelConfig:
    detector: str = "retinanet"  # "retinanet", "fcos" or "faster_rcnn"
    student_backbone: str = "mobilenet_v2"  # "mobilenet_v2" or "resnet18/34/50/101"
    teacher_backbone: str = "resnet18"  # as student_backbone; trained from scratch at 2x
    fpn_channels: int = 256  # FPN width of both detectors (the paper's 256)
    num_classes: int = 0  # 0: take it from the dataset's categories
    anchor_scale: float = 4.0  # anchor side / stride (torchvision: 4); small objects want 2
    # One-stage students: 3 = P3-P7 (torchvision), 2 = P2-P6, stride 4: at half resolution the student needs it
    # to cover objects of 4-12 px (`scalekd data stats --config` reports the coverage). The teacher stays on
    # P3-P7: at 2x its P3 anchors are the student's P2 anchors.
    student_min_level: int = 3


@dataclass(frozen=True)
class SDFConfig:
    enabled: bool = True  # Scale-Decoupled Feature distillation (section 3.1); false: the ablation
    dilations: tuple[int, ...] = (1, 2, 3)  # one branch per dilation, the same weights for all
    weight_sharing: bool = True  # false: one block per dilation (Table 7)
    embed_channels: int = 128  # width the student C5 is projected to
    bottleneck_ratio: int = 4  # the bottleneck block's reduction


@dataclass(frozen=True)
class CSAConfig:
    enabled: bool = True  # the Cross-Scale Assistant (section 3.2); false: the ablation without it (no assistant and no
    # output-distillation terms; SDF and the cross-head terms remain)
    attention: str = "multiscale"  # "multiscale" | "plain" (Table 6 ablation)
    head: str = "own"  # "shared" (the paper): the student's head, not stepped; "own": a copy the assistant trains
    heads: int = 8  # attention heads, split evenly over the pooling rates
    # Pooling rates on the teacher's paired map, one per head group. With distill.pairing=scale_aligned that map
    # is on the student's grid (rate 1 = the student's cells); with same_level it is 2x finer (the paper: 2, 4).
    rates: tuple[int, ...] = (1, 2)
    lr: float = 3e-4  # 0: the attention frozen (with head_lr null or 0 the whole assistant: no optimizer, no backward)
    # Not in the paper: the learning rate of the assistant's own head (head=own); None: lr, 0: frozen, so an
    # assistant that starts as the teacher can change the teacher's predictions only through the attention.
    head_lr: float | None = None
    weight_decay: float = 1e-4  # the assistant's Adam weight decay
    # Not in the paper: the assistant trains alone this many iterations (the student's weights still) before
    # distillation starts, so its first targets are better than the student's own predictions.
    warmup_iterations: int = 200
    # Not in the paper (see csa.py): a learned distance bias that starts the attention on the query's own
    # footprint ("distance_bias") or none (the paper), and a zero-initialised output projection.
    locality: str = "distance_bias"
    zero_init_output: bool = True  # the output projection starts at zero (see locality)
    # "teacher" (the method) or "student": a control in which keys and values come from the student's own
    # map (upsampled 2x, so the pooling rates mean what they mean on the teacher's), to measure how much of
    # the assistant's lead is the teacher's knowledge and how much is the assistant's own capacity.
    keys_from: str = "teacher"
    # Not in the paper: what the assistant is before it trains. "student" (the paper): the attention's output is
    # added onto the student's map and read by a copy of the student's head. "teacher": added onto the teacher's
    # scale-aligned map and read by a copy of the teacher's head, so with zero_init_output the assistant starts as
    # exactly the 2x teacher's predictions on the student's anchors (OD's targets) and learns from the ground
    # truth what to change given the student's queries. Needs scale_aligned pairing, a one-stage detector, the
    # assistant's own head and teacher_scale 2; "auto" (default): teacher where those hold, else student. The
    # no-teacher control (keys_from=student) starts as the student.
    starts_as: str = "auto"
    # Not in the paper: the weight of a second term in the assistant's own loss, the output distillation (beta's
    # classification and gamma's box terms, as OD gives a student) from the 2x teacher's predictions on the student's
    # anchors. 0 (default): the ground truth alone. An assistant that starts as a teacher which knows its training
    # images by heart sharpens towards the ground truth and passes on less than the teacher (KIT); this keeps
    # it near the teacher's graded scores unless the ground truth pays for the move. Needs the teacher's predictions
    # on the student's anchors (as starts_as=teacher) and keys from the teacher (the control must not see it).
    teacher_anchor: float = 0.0


@dataclass(frozen=True)
class CrossKDConfig:
    """CrossKD (Wang et al., CVPR 2024), a baseline (``distill.method=crosskd``; scalekd/distill/crosskd.py)."""

    # The head conv (of torchvision's 4 per branch) whose pre-activation features cross into the teacher's head:
    # CrossKD's reused_teacher_head_idx, 3 in its RetinaNet and FCOS configs.
    head_index: int = 3
    focal_beta: float = 1.0  # the beta of its quality focal loss (KDQualityFocalLoss)


@dataclass(frozen=True)
class DistillConfig:
    # "aligned" (our defaults, below) or "paper": the paper's literal reading, applied by load_config beneath the
    # fields a user sets (PAPER_RECIPE). Recorded in the config so a run says which one it started from.
    recipe: str = "aligned"
    method: str = "scalekd"  # "scalekd", or a baseline: "none", "fitnet", "od", "pkd", "crosskd"
    # Which teacher level a student level learns from. "scale_aligned" (MSAD, CVPR 2021): student P_l with the
    # 2x teacher's P_{l+1}, the same grid and the same objects in image terms, whose anchors are the student's
    # (P7's successor by max-pooling). "same_level" (the paper): P_l with P_l, the teacher's map 2x finer.
    pairing: str = "scale_aligned"
    alpha: float | None = None  # None: the paper's value for the detector family
    beta: float | None = None  # output classification weight; None: the paper's
    gamma: float | None = None  # output box weight; None: the paper's
    temperature: float = 1.0  # softening of the soft classification targets
    background_weight: float = 1.5  # Chen et al. 2017
    margin: float = 0.0  # bounded regression margin m
    # Not in the paper: alpha, beta and gamma rise linearly from 0 over the student's first N distillation
    # iterations (0: full weight from the first). A warm student is far from the teacher's outputs, so at full
    # weight the first steps' output term is ~20x the detection loss (KIT: kd/cls ~23 x beta 0.2 against a focal
    # loss of 0.2) and knocks the warm student's classification back (its focal loss 0.2 -> 1.0).
    kd_ramp_iterations: int = 0
    # Not in the paper: with method=scalekd, CrossKD's cross-head terms (the student's head features finished by the
    # 2x teacher's head on its scale-aligned maps, distilled towards that head's own predictions; scalekd/distill/
    # crosskd.py, distill.crosskd) added to ScaleKD's loss at this multiple of CrossKD's weights (0: none). Both
    # signals come from the same 2x teacher: the assistant's targets reach the student's outputs, the cross-head
    # terms its head features. "auto" (the default; docs/results.md): 2 where the terms can be formed
    # (Config.cross_head_possible), else 0, so the no-teacher control (csa.keys_from=student, whose "teacher" head
    # would be the student's own: the terms vanish), the baselines, two-stage detectors and the paper's same-level
    # reading get none; a number > 0 is refused where they cannot be formed; 0 turns them off.
    cross_head_weight: float | Literal["auto"] = "auto"
    sdf: SDFConfig = field(default_factory=SDFConfig)
    csa: CSAConfig = field(default_factory=CSAConfig)
    crosskd: CrossKDConfig = field(default_factory=CrossKDConfig)


@dataclass(frozen=True)
class ExperimentalConfig:
    """Options measured (or never shown) no better than their defaults, kept for the results that rest on them
    (docs/results.md, docs/method.md) and for ablations against the paper; each default is the recipe's. Before
    config version 10 they lived beside the settings they change (``model.assigner``, ``distill.sdf.teacher_sdf``,
    ...); a config written that way still loads (``scalekd.config_versions``)."""

    # RetinaNet's anchor assignment, both roles: "max_iou" (torchvision: IoU >= 0.5 positive) or "atss" (adaptive
    # per object: tiny objects between anchor centres get positives). Measured on the bench's RetinaNet P2-P6: ATSS
    # covers more small objects but trains worse plain students (k 1: -4.0 AP_S; quality_assign_*.json), and FCOS
    # covers and trains best, so the presets run FCOS.
    assigner: str = "max_iou"
    # ATSS's k: candidate cells per level and object, whose anchors the IoU threshold (mean + std) is taken over.
    # 9 is the original code's reading (k x anchors per cell: 81 candidates with RetinaNet's 9 anchors per cell);
    # 1 gives mmdetection's ATSSAssigner (k anchors: the 9 of the nearest cell).
    atss_topk: int = 9
    # RetinaNet's max_iou thresholds, both roles: an anchor is positive at IoU >= positive_iou with an object,
    # background below negative_iou, ignored between (torchvision: 0.5 / 0.4). 0.4 / 0.3 covers more 4-7 px
    # objects with the same anchors, but the plain student trained worse with it (AP_S 34.6 vs 38.3).
    positive_iou: float = 0.5
    negative_iou: float = 0.4  # see positive_iou: background below this IoU
    # RetinaNet's box loss, every stage: "l1" on the encoded deltas (torchvision's RetinaNet) or "giou" on the decoded
    # boxes (torchvision's v2 recipe): with max_iou inside the run-to-run spread, with ATSS no help. FCOS always uses
    # GIoU.
    box_loss: str = "l1"
    # SDF's teacher side (the paper is silent): "shared" (one module for both sides, gradient only through the
    # student's) or "frozen" (a frozen copy of the initial module). No result of record shows frozen better; kept
    # as the other reading of the paper.
    teacher_sdf: str = "shared"
    # Position codes on the assistant's queries and keys: "sine" (DETR's 2D sine code) or "none" (the paper's
    # text); no difference measured (AP_S 8.10 +- 0.19 vs 8.13 +- 0.30).
    csa_positional: str = "sine"
    # Recompute the assistant's predictions after its step for the student's targets (a third pass through
    # the head, +15-18% per iteration on CPU) or use the ones its step was computed from (one Adam step older).
    csa_recompute: bool = False
    # Output distillation's box term: "bounded" (Chen et al.'s teacher-bounded regression, the paper's), or "l2" /
    # "smooth_l1" mimicry of the assistant's boxes; no result of record shows either better.
    bbox_loss: str = "bounded"


@dataclass(frozen=True)
class TrainConfig:
    teacher_iterations: int = 200  # the teacher stage's iterations
    warmup_iterations: int = 200  # the student warm-up's iterations
    distill_iterations: int = 200  # the distillation stage's student iterations
    freeze_backbone_iterations: int = 50  # student warm-up: backbone frozen this long
    batch_size: int = 4  # images per worker per iteration
    lr: float = 0.01  # SGD learning rate of the detectors
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    lr_warmup_iterations: int = 50  # linear learning-rate warm-up at the start of each stage
    lr_steps: tuple[float, ...] = (0.67, 0.89)  # fractions of the stage where lr drops by lr_gamma
    lr_gamma: float = 0.1  # factor applied at each of lr_steps
    grad_clip: float = 10.0  # gradient norm clip
    checkpoint_interval: int = 100  # iterations between checkpoints (a rerun resumes from the latest)
    log_interval: int = 10  # iterations between metrics.jsonl lines
    seed: int = 0  # data order and initialisation
    amp: bool = True  # mixed precision, used on GPU only
    # NHWC conv weights: 14% faster per ScaleKD iteration on an AVX-512 Xeon, 9% slower on an AVX2-only EPYC.
    # "auto" times both once per machine and caches the answer (scalekd/train/memory_format.py).
    channels_last: bool | Literal["auto"] = "auto"


@dataclass(frozen=True)
class ScalingConfig:
    workers: int = 1  # Ray Train workers (DDP)
    # Elastic training: with 0 < min_workers < workers, a run that loses workers (a node) goes on with as few as
    # min_workers from its last checkpoint instead of waiting for the lost capacity. 0: a fixed group.
    min_workers: int = 0
    gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker
    max_failures: int = 2  # restores from the last checkpoint after a worker or node dies
    ray_address: str = ""  # "" = in-process local Ray; else submit a Ray job there


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str = ""  # "" = AWS_ENDPOINT_URL or AWS default
    region: str = ""  # S3 region ("" = AWS_DEFAULT_REGION or none)


@dataclass(frozen=True)
class EvalConfig:
    max_detections: tuple[int, ...] = (1, 10, 100)  # VisDrone: (1, 10, 100, 500)
    # Tiny-object size bands by object side in px of the annotated image (VisDrone/AI-TOD: very tiny < 8,
    # tiny 8-16, small 16-32), reported beside COCO's S/M/L as AP_0-8px, ...; [] for none.
    size_band_edges: tuple[int, ...] = (0, 8, 16, 32)
    score_threshold: float = 0.05  # detections below this score are dropped before COCO evaluation
    batch_size: int = 4  # images per evaluation batch


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)

    @property
    def one_stage(self) -> bool:
        return self.model.detector in ONE_STAGE

    @property
    def teacher_size(self) -> int:
        return int(round(self.data.student_size * self.data.teacher_scale))

    @property
    def teacher_size_divisible(self) -> int:
        """The teacher pads to teacher_scale x the student's 32, so its canvas is exactly teacher_scale x the
        student's and its grids line up with the student's (validated to be an integer)."""
        return int(round(32 * self.data.teacher_scale))

    @property
    def teacher_start_possible(self) -> bool:
        """The 2x teacher's P_{l+1} head predicts on the student's anchors (``distill.csa.starts_as``)."""
        k = self.distill
        return (k.pairing == "scale_aligned" and self.one_stage and k.csa.head == "own"
                and self.data.teacher_scale == 2.0)

    @property
    def assistant_starts_as_teacher(self) -> bool:
        """The assistant starts as the teacher's predictions: asked for (or ``auto`` and possible) and the keys
        are the teacher's (the no-teacher control starts as the student)."""
        c = self.distill.csa
        wanted = c.starts_as == "teacher" or (c.starts_as == "auto" and self.teacher_start_possible)
        return wanted and c.keys_from == "teacher"

    @property
    def cross_head_possible(self) -> bool:
        """CrossKD's cross-head terms can be formed beside ScaleKD's: the student's head features finished by the 2x
        teacher's P_{l+1} head, which is the same grid and anchors only with scale-aligned pairing on a one-stage
        detector, and a teacher to read (the no-teacher control's keys come from the student)."""
        return _method(self.distill.method).cross_head_possible(self)

    @property
    def cross_head_weight(self) -> float:
        """``distill.cross_head_weight`` with ``auto`` resolved: AUTO_CROSS_HEAD_WEIGHT where possible, else 0."""
        weight = self.distill.cross_head_weight
        if weight == "auto":
            return AUTO_CROSS_HEAD_WEIGHT if self.cross_head_possible else 0.0
        return float(weight)

    @property
    def assistant_head_lr(self) -> float:
        """The rate of the assistant's own head (``csa.head=own``): ``csa.head_lr``, or ``csa.lr`` when null."""
        c = self.distill.csa
        return c.lr if c.head_lr is None else c.head_lr

    @property
    def assistant_trains(self) -> bool:
        """Something in the assistant has a rate above 0: the attention, or its own head."""
        c = self.distill.csa
        return c.lr > 0 or (c.head == "own" and self.assistant_head_lr > 0)

    def loss_weights(self) -> tuple[float, float, float]:
        """(alpha, beta, gamma), the method's defaults filled in (the paper's for the detector family; PKD's and
        CrossKD's own for theirs) where the config leaves them null."""
        defaults = _method(self.distill.method).default_weights(
            PAPER_WEIGHTS["one_stage" if self.one_stage else "two_stage"])
        given = (self.distill.alpha, self.distill.beta, self.distill.gamma)
        return tuple(d if g is None else g for g, d in zip(given, defaults))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# The paper's literal reading, one switch away (distill.recipe=paper): what the "aligned" defaults change.
PAPER_RECIPE: dict = {
    "pairing": "same_level",
    "cross_head_weight": 0.0,
    "csa": {"head": "shared", "rates": [2, 4], "warmup_iterations": 0, "locality": "none",
            "zero_init_output": False, "starts_as": "student"},
}
# What distill.cross_head_weight=auto means where the terms can be formed: twice CrossKD's own weights, measured
# against 1x on DSB2018 nuclei and on the synthetic set (docs/results.md).
AUTO_CROSS_HEAD_WEIGHT = 2.0


def _load_presets() -> dict[str, dict]:
    """The presets shipped in the package (``scalekd/presets/NAME.yaml``): overrides on the defaults, each file
    values only; what they rest on is in docs/presets.md."""
    from importlib import resources

    folder = resources.files("scalekd") / "presets"
    return {entry.name[: -len(".yaml")]: parse_yaml(entry.read_text(encoding="utf-8")) or {}
            for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".yaml")}


PRESETS: dict[str, dict] = _load_presets()


def load_config(path: str | None = None, preset: str | None = None,
                overrides: list[str] | None = None, text: str | None = None) -> Config:
    """Defaults <- preset <- YAML file (or text) <- `key=value` overrides; then validate."""
    merged: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError("preset", preset, f"one of {', '.join(PRESETS)}")
        merged = copy.deepcopy(PRESETS[preset])
    if text is None and path is not None:
        from scalekd import storage

        if not storage.is_s3(path) and os.path.isdir(path):
            raise ConfigError("--config", path, "is a folder; give a YAML file")
        text = storage.read_text(path)  # names the file and the byte when it is not UTF-8
    if text is not None:
        try:
            loaded = parse_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", path or "<text>", f"not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", loaded, "a mapping of sections (data, model, distill, ...)")
        _deep_update(merged, loaded)
    _apply_overrides(merged, overrides or [])
    merged, moves = _upgraded(merged)
    for move in moves:  # a user's file or override written for an earlier version: say where the setting lives now
        log.warning("%s is now %s (config version %d); the old name still works", ".".join(move.old),
                    ".".join(move.new), move.version)
    return config_from_dict(apply_recipe(merged))


def paper_recipe(student_min_level: int) -> dict:
    """The distill fields ``recipe=paper`` sets. A P2-P6 student keeps scale-aligned pairing and its rates: the
    teacher has no P2, pairing the lists by position (the paper's P3-P7 with P3-P7) is then scale alignment
    anyway, and the paper's rates 2 and 4 on a 2x map are rates 1 and 2 on the scale-aligned map."""
    fields = copy.deepcopy(PAPER_RECIPE)
    if student_min_level == 2:
        del fields["pairing"], fields["csa"]["rates"]
    return fields


def apply_recipe(raw: dict) -> dict:
    """``distill.recipe=paper``: the paper's settings beneath whatever the raw config sets itself."""
    distill = raw.get("distill")
    if isinstance(distill, dict) and distill.get("recipe") == "paper":
        model = raw.get("model")
        model = model if isinstance(model, dict) else {}
        base = paper_recipe(model.get("student_min_level", ModelConfig.student_min_level))
        _deep_update(base, distill)
        raw = {**raw, "distill": base}
    return raw


def _apply_overrides(merged: dict, overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, item, "overrides look like section.field=value")
        node = merged
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, raw, f"'{part}' is not a section")
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(key, raw, f"a YAML value ({exc.problem or exc})") from None


def config_from_dict(raw: dict) -> Config:
    """The typed, validated config; the edge where an endpoint's credentials leave it (``storage.adopt_endpoint``):
    the config, and every model, checkpoint and card that stores it, holds the clean URL only."""
    from scalekd import storage

    cfg = _build(Config, _upgraded(raw)[0] if isinstance(raw, dict) else raw, "")
    validate(cfg)
    clean = storage.adopt_endpoint(cfg.storage.endpoint_url)
    return cfg if clean == cfg.storage.endpoint_url else replace(cfg, storage={"endpoint_url": clean})


def _upgraded(raw: dict) -> tuple[dict, list]:
    """``raw`` with settings written at their place in an earlier config version moved to today's
    (``scalekd.config_versions.upgrade``: models and checkpoints store the config they ran)."""
    from scalekd.config_versions import MovedTwiceError, setting, upgrade

    try:
        return upgrade(raw)
    except MovedTwiceError as exc:
        old, new = exc.args
        raise ConfigError(old, setting(raw, *old.split(".")), f"set at {new} too: give it once, at {new} (config "
                          f"version 10 moved it there)") from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", raw, "a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, raw[unknown[0]], f"unknown field; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        allowed = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, path)
            except ConfigError as exc:
                allowed.append(exc.allowed)
        raise ConfigError(path, value, " or ".join(allowed))
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(path, value, " or ".join(repr(a) for a in args))
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, "a list")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(path, value, "a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")


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


def _method(name: str):
    """The registered distillation method class (imported here: the methods import torch, the config does not)."""
    from scalekd.distill.methods import method_class

    return method_class(name)


def _method_names() -> tuple[str, ...]:
    from scalekd.distill.methods import method_names

    return method_names()


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


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with fields of named sections replaced, validated again."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        _deep_update(raw.setdefault(section, {}), values)
    return config_from_dict(raw)


def _deep_update(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
