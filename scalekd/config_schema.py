"""The config's schema: one frozen dataclass per section, with the comments beside each field that
docs/configuration.md is generated from (``scalekd.config_reference``), and what the sections imply together
(``Config``'s properties). Loading is ``scalekd.config``, validation ``scalekd.config_validation``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

DETECTORS = ("retinanet", "fcos", "faster_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
PAIRINGS = ("scale_aligned", "same_level")
ASSIGNERS = ("max_iou", "atss")  # RetinaNet's anchor assignment (scalekd.models.parts.DetectorParts.match)
BOX_LOSSES = ("l1", "giou")  # RetinaNet's box regression loss (torchvision's _box_loss)
ONE_STAGE = ("retinanet", "fcos")
MAX_FPN_CHANNELS = 2048  # 8x torchvision's 256: beyond it a model is a typo that would exhaust memory, not a design
# Paper, section 4.1: loss weights (alpha, beta, gamma) per detector family.
PAPER_WEIGHTS = {"one_stage": (0.01, 0.2, 0.05), "two_stage": (0.07, 0.5, 0.2)}


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


def _method(name: str):
    """The registered distillation method class (imported here: the methods import torch, the config does not)."""
    from scalekd.distill.methods import method_class

    return method_class(name)


def _method_names() -> tuple[str, ...]:
    from scalekd.distill.methods import method_names

    return method_names()


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
