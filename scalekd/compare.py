"""``scalekd compare``: does a 2x teacher make *this* dataset's compact detector see small things better?

The quality protocol as a product command. The 2x teacher and the warm student are trained once; each variant
(plain student, ScaleKD, the no-teacher control, the baselines on request) distils from the same pair over N paired
seeds, and every model is evaluated on one named split with one detection cap. The report pairs the variants by
seed, gives 95% intervals of the differences, and says in words what the teacher added, beside what explains a
missing gain: the teacher's own AP_S, the student's anchor coverage, AP per size band.

Seeds vary the distillation only (its data order and the modules it adds), not the teacher or the warm student: the
spread is the distillation's alone, and the teacher costs one training however many seeds run.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from scalekd import storage
from scalekd.config import Config, paper_recipe, replace
from scalekd.data.annotations import SPLIT_RULE, DataError, is_split_name, split_annotations

log = logging.getLogger(__name__)

# Variant name -> its overrides of ``distill`` on the compared config ("paper": the paper's literal recipe).
VARIANTS: dict[str, dict | str] = {
    "plain": {"method": "none"},  # the warm student trained on, same iterations, no teacher
    "fitnet": {"method": "fitnet"},
    # Chen et al.'s output distillation from the same 2x teacher; scale-aligned pairing makes its P_{l+1} outputs
    # predictions on the student's own anchors.
    "od": {"method": "od"},
    "pkd": {"method": "pkd"},  # Cao et al. 2022 (mmrazor's feature baseline), scale-aligned maps
    # Wang et al. 2024: the student's head features finished by the 2x teacher's head, distilled towards the
    # teacher's own predictions.
    "crosskd": {"method": "crosskd"},
    "scalekd": {},  # the default recipe
    # The control: the same recipe with every teacher input taken from the student's own maps, so what is left
    # is self-distillation. The default minus the control is what the teacher adds.
    "scalekd_no_teacher": {"csa": {"keys_from": "student"}},
    "scalekd_paper": "paper",  # the paper's literal reading (config.PAPER_RECIPE)
    # Ablations of the default.
    "scalekd_no_cross_head": {"cross_head_weight": 0.0},
    "scalekd_crosskd": {"cross_head_weight": 1.0},  # the cross-head terms at weight 1 whatever auto resolves to
    "scalekd_cross_head_2": {"cross_head_weight": 2.0},  # the cross-head terms at twice CrossKD's weights
    "scalekd_student_start": {"csa": {"starts_as": "student"}},
    "no_sdf": {"sdf": {"enabled": False}},
    "no_csa": {"csa": {"enabled": False}},
    "plain_attention": {"csa": {"attention": "plain"}},
    "no_locality": {"csa": {"locality": "none", "zero_init_output": False}},
    "no_assistant_warmup": {"csa": {"warmup_iterations": 0}},
    "assistant_head_frozen": {"csa": {"head_lr": 0.0}},
    # Nothing of the assistant trained: it stays the teacher's scale-aligned predictions.
    "assistant_untrained": {"csa": {"lr": 0.0, "warmup_iterations": 0}},
    "assistant_untrained_no_sdf": {"sdf": {"enabled": False}, "csa": {"lr": 0.0, "warmup_iterations": 0},
                                   "cross_head_weight": 0.0},
    "assistant_teacher_anchored": {"csa": {"teacher_anchor": 1.0}},
    "assistant_teacher_anchored_5": {"csa": {"teacher_anchor": 5.0}},
    "od_kd_ramp": {"method": "od", "kd_ramp_iterations": 100},
    "scalekd_kd_ramp": {"kd_ramp_iterations": 100},
}
DEFAULT_VARIANTS = ("plain", "scalekd", "scalekd_no_teacher")
REFERENCE_MODELS = ("teacher", "warm")  # trained once, reported beside the students, never paired
METRIC_KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


class CompareError(ValueError):
    """A compare request that cannot run; raised before any training."""


@dataclasses.dataclass(frozen=True)
class CompareRequest:
    data: str  # dataset root, local or s3://
    out: str  # where stages, models and the report go, local or s3://
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    eval_split: str = "val"
    # Detections per image for the detector and COCO's AP alike: raise it where images hold more than 100 objects.
    max_detections: int = 100
    use_ray: bool = True  # False: every stage in this process (benchmarks, debugging)


def variant_config(base: Config, name: str) -> Config:
    """The variant's config: its overrides of ``distill`` on the base config."""
    overrides = VARIANTS[name]
    if isinstance(overrides, str):  # "paper": the paper's recipe for this student
        overrides = {"recipe": "paper", **paper_recipe(base.model.student_min_level)}
    return replace(base, distill=overrides)


def eval_config(cfg: Config, max_detections: int) -> Config:
    """Every model evaluated the same way: scores down to 0.001, and one detection cap read by the detector's own
    ``detections_per_img`` and by COCO's AP (its largest ``maxDets``)."""
    caps = tuple(sorted({1, 10, 100, max_detections}))
    return replace(cfg, eval={"score_threshold": 0.001, "max_detections": caps})


def check_request(cfg: Config, request: CompareRequest) -> None:
    """Everything that can be refused is refused here, before the first stage trains."""
    unknown = [v for v in request.variants if v not in VARIANTS]
    if unknown or not request.variants or len(set(request.variants)) != len(request.variants):
        raise CompareError(f"--variants {' '.join(request.variants) or '(none)'}: give distinct names among "
                           f"{', '.join(VARIANTS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if not request.seeds or len(set(request.seeds)) != len(request.seeds) or min(request.seeds) < 0:
        raise CompareError(f"--seeds {list(request.seeds)}: give distinct non-negative integers")
    if request.max_detections < 1:
        raise CompareError(f"--max-detections {request.max_detections}: a positive number of detections per image")
    if not is_split_name(request.eval_split):
        raise CompareError(f"--eval-split {request.eval_split!r}: {SPLIT_RULE}")
    if request.eval_split == cfg.data.train_split:
        raise CompareError(f"--eval-split {request.eval_split}: the split the models train on (data.train_split); "
                           "evaluate on images they never saw (val, or a test split)")
    for role, split in (("training", cfg.data.train_split), ("evaluation", request.eval_split)):
        uri = annotation_uri(request.data, split)
        if not storage.exists(uri):
            raise DataError(f"{request.data} has no {role} split '{split}': {uri} does not exist (a dataset root "
                            "holds annotations/instances_<split>.json and images/)")
    for name in request.variants:
        variant_config(cfg, name)  # a variant this config cannot run (e.g. two-stage + cross-head) says so now


def annotation_uri(root: str, split: str) -> str:
    return split_annotations(root, split)


def run_compare(cfg: Config, request: CompareRequest) -> dict:
    """Train the teacher and the warm student once, every variant per seed, evaluate; the report is rewritten
    after every seed, so a run cut short keeps its finished seeds, and a rerun reuses every finished stage."""
    from scalekd.compare_report import coverage_summary, write_report

    check_request(cfg, request)
    started = time.time()
    cfg = replace(cfg, data={"root": request.data})
    coverage = coverage_summary(cfg, annotation_uri(request.data, request.eval_split))
    models = _reference_models(cfg, request)
    evaluation = eval_config(cfg, request.max_detections)
    reference = {r.name: _row(r) for r in _evaluate(models, request, evaluation)}
    results: dict[str, list[dict]] = {name: [] for name in request.variants}
    doc: dict = {}
    for seed in request.seeds:
        students = _distil_seed(cfg, request, models, seed)
        for result in _evaluate(students, request, evaluation):
            results[result.name].append({"seed": seed, **_row(result)})
        doc = write_report(request, cfg, reference, results, coverage, time.time() - started)
        log.info("compare: seed %d done (%.0f s)", seed, time.time() - started)
    return doc


def _reference_models(cfg: Config, request: CompareRequest) -> dict[str, str]:
    """The teacher (only where some variant reads one) and the warm student, trained once at the first seed."""
    from scalekd.distill.methods import method_class  # torch: not at import, the CLI's parser reads VARIANTS

    needs_teacher = any(method_class(variant_config(cfg, v).distill.method).needs_teacher() for v in request.variants)
    first = replace(cfg, train={"seed": request.seeds[0]})
    models = {}
    for stage, name in (("teacher", "teacher"), ("warmup", "warm")):
        if name == "teacher" and not needs_teacher:
            continue
        out = storage.join(request.out, stage)
        _launch(stage, first, request, out)
        models[name] = storage.join(out, "model.pt")
    return models


def _distil_seed(cfg: Config, request: CompareRequest, models: dict[str, str], seed: int) -> dict[str, str]:
    """Every variant's distillation at one seed, from the shared teacher and warm student."""
    students = {}
    for name in request.variants:
        out = storage.join(request.out, f"seed{seed}", name)
        variant = replace(variant_config(cfg, name), train={"seed": seed})
        _launch("distill", variant, request, out, teacher=models.get("teacher", ""), student=models["warm"])
        students[name] = storage.join(out, "model.pt")
    return students


def _launch(stage: str, cfg: Config, request: CompareRequest, out: str, teacher: str = "",
            student: str = "") -> dict:
    from scalekd.train.stage import StageRequest
    from scalekd.train.ray_runner import launch

    return launch(StageRequest(stage, cfg.to_dict(), request.data, out, teacher=teacher, student_init=student),
                  cfg, use_ray=request.use_ray)


def _evaluate(models: dict[str, str], request: CompareRequest, cfg: Config) -> list:
    from scalekd.eval.evaluate import evaluate_models

    return evaluate_models(models, request.data, cfg, split=request.eval_split)


def _row(result) -> dict:
    """A model's metrics in percent (COCO's keys and the size bands; one COCO could not compute left out)."""
    keys = [*METRIC_KEYS, *(k for k in result.metrics if k.startswith("AP_") and k.endswith("px"))]
    return {**{k: round(100 * result.metrics[k], 3) for k in keys if result.metrics[k] >= 0},
            "params": result.parameters}
