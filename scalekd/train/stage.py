"""One stage from request to model file: teacher (detection loss at 2x), warm-up (student alone, backbone frozen
for the first F iterations), distill (the Distiller, from the warm student and the trained teacher).

``run_stage`` builds the stage's models and optimisers, resumes from the newest checkpoint of the same inputs,
hands the iterations to the loop (``scalekd.train.loop``) with the hooks that checkpoint, log and report, and
writes the model, its card and the summary. It runs in a plain process or as a Ray Train worker; rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from scalekd import storage
from scalekd.config import Config, config_from_dict
from scalekd.data.coco import CocoDetection, DataError, dataset_from_root
from scalekd.data.holdout import stage_images
from scalekd.distill.distiller import Distiller, Optimizers
from scalekd.distill.methods import method_class
from scalekd.geometry import DetectorSpec, student_spec, teacher_spec
from scalekd.models.detectors import build_detector
from scalekd.models.parts import DetectorParts
from scalekd.train import checkpoint as ckpt
from scalekd.train import loop
from scalekd.train.distributed import make_grad_sync, rank_and_world
from scalekd.train.hooks import BackboneFreeze, Checkpoints, FaultInjection, LoopHook, Metrics, MetricsLog, Progress
from scalekd.train.keys import inputs_key, same_inputs
from scalekd.train.loop import TrainingError
from scalekd.train.memory_format import use_channels_last
from scalekd.train.schedule import build_scheduler
from scalekd.tracking import Tracker, flat_params

log = logging.getLogger(__name__)
STAGES = ("teacher", "warmup", "distill")


@dataclass(frozen=True)
class StageRequest:
    """Everything a worker needs, as plain data (Ray's ``train_loop_config``)."""

    stage: str
    config: dict
    data: str
    out: str
    teacher: str = ""  # distill: the teacher's model file
    student_init: str = ""  # distill: the warm student's model file
    stop_at: int = 0  # stop (checkpointed, resumable) at this iteration; 0 = the stage's end

    def to_dict(self) -> dict:
        return asdict(self)


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


class StageHooks:
    """What an orchestrator adds to a stage, called on every rank: checkpoints it keeps and gives back on restore
    (Ray Train's ``report``/``get_checkpoint``). The default does nothing: a plain process needs no orchestrator."""

    def restore(self) -> dict | None:
        """A checkpoint state the orchestrator kept for this run, or None."""
        return None

    def checkpointed(self, iteration: int, metrics: dict, state: dict | None) -> None:
        """After each checkpoint; ``state`` on rank 0 only."""


def stage_iterations(cfg: Config, stage: str) -> tuple[int, int]:
    """(the student's iterations, the assistant-only iterations that come first and do not count against them)."""
    student = {"teacher": cfg.train.teacher_iterations, "warmup": cfg.train.warmup_iterations,
               "distill": cfg.train.distill_iterations}[stage]
    assistant = method_class(cfg.distill.method).assistant_iterations(cfg) if stage == "distill" else 0
    return student, assistant


def completed_summary(request: StageRequest, key: str | None = None) -> dict | None:
    """The summary of this very stage if it already finished at ``request.out`` (same inputs), else None; a
    finished stage from other inputs is refused, never overwritten."""
    summary_uri = storage.join(request.out, "summary.json")
    if not (storage.exists(ckpt.model_uri(request.out)) and storage.exists(summary_uri)):
        return None
    summary = json.loads(storage.read_text(summary_uri))
    student, assistant = stage_iterations(config_from_dict(request.config), request.stage)
    end = min(student + assistant, request.stop_at) if request.stop_at else student + assistant
    stored_config = lambda: ckpt.load(ckpt.model_uri(request.out)).get("config")  # read only if the keys differ
    if summary.get("stage") != request.stage or not same_inputs(request, key or inputs_key(request),
                                                                summary.get("inputs_key"), stored_config):
        raise TrainingError(f"{request.out} holds a finished {summary.get('stage')} stage from other inputs (stage, "
                            "config, data or starting models differ); use a fresh output URI or remove it")
    return summary if summary.get("iterations") == end else None


@dataclass
class Stage:
    """One stage's models and optimizers, built from the request."""

    spec: DetectorSpec
    model: nn.Module
    distiller: Distiller | None
    student_opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    assistant_opt: torch.optim.Optimizer | None
    opt: Optimizers
    parts: DetectorParts  # the model's step-by-step forward and loss, with the configured assignment
    assistant_iterations: int  # the assistant-only iterations that come first (0 without an assistant warm-up)


def _check_categories(model_uri: str, blob: dict, dataset: CocoDetection | None) -> None:
    from scalekd.eval.evaluate import check_categories

    if dataset is not None:
        check_categories(model_uri, blob.get("categories"), dataset, use="distill with it")


def build_stage(request: StageRequest, cfg: Config, num_classes: int, device: torch.device, world: int,
                dataset: CocoDetection | None = None) -> Stage:
    """The stage's model, distiller and optimisers; a distill stage's teacher and warm student must have been
    trained on ``dataset``'s categories (ids and names), when it is given."""
    spec = teacher_spec(cfg, num_classes) if request.stage == "teacher" else student_spec(cfg, num_classes)
    model = build_detector(spec)
    if cfg.model.detector == "retinanet":  # torchvision reads its box loss from this attribute (its v2 recipe)
        model.head.regression_head._loss_type = cfg.experimental.box_loss
    distiller = None
    if request.stage == "distill":
        needs_teacher = method_class(cfg.distill.method).needs_teacher()
        if not request.student_init or (not request.teacher and needs_teacher):
            raise TrainingError("the distill stage needs --teacher MODEL and --student MODEL (warm-up output)")
        warm, blob = ckpt.load_model(request.student_init, expect=spec)
        _check_categories(request.student_init, blob, dataset)
        model.load_state_dict(warm.state_dict())
        teacher = None
        if needs_teacher:
            teacher, blob = ckpt.load_model(request.teacher, expect=teacher_spec(cfg, num_classes))
            _check_categories(request.teacher, blob, dataset)
        distiller = Distiller(model, teacher, cfg).to(device)
    params = distiller.student_parameters() if distiller is not None else list(model.parameters())
    model.to(device)
    if use_channels_last(cfg.train.channels_last, device):
        # The distiller carries the teacher along. (Module.to takes memory_format; its annotation does not say so.)
        (distiller or model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    student_opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                  weight_decay=cfg.train.weight_decay)
    scheduler = build_scheduler(student_opt, stage_iterations(cfg, request.stage)[0], cfg.train.lr_warmup_iterations,
                                cfg.train.lr_steps, cfg.train.lr_gamma)
    assistant_opt = None
    if distiller is not None and distiller.assistant_trains:
        assistant_opt = torch.optim.Adam(distiller.assistant_param_groups(), lr=cfg.distill.csa.lr,
                                         weight_decay=cfg.distill.csa.weight_decay)
    opt = Optimizers(student_opt, assistant_opt, cfg.train.grad_clip, make_grad_sync(world))
    parts = (distiller.student_parts if distiller is not None
             else DetectorParts(model, cfg.experimental.assigner, cfg.experimental.atss_topk))
    return Stage(spec, model, distiller, student_opt, scheduler, assistant_opt, opt, parts,
                 stage_iterations(cfg, request.stage)[1])


def resume(stage: Stage, request: StageRequest, key: str, kept: dict | None = None) -> int:
    """Load the newest checkpoint of this stage and inputs into ``stage``: the latest at ``request.out`` or the
    one the orchestrator ``kept`` (Ray Train's), whichever is further; returns its iteration."""
    latest = ckpt.latest_checkpoint(request.out)
    state = ckpt.load(latest) if latest is not None else None
    if kept is not None and kept.get("inputs_key") == key and kept.get("stage") == request.stage and \
            int(kept["iteration"]) > int((state or {}).get("iteration", -1)):
        latest, state = "the orchestrator's checkpoint", kept
    if state is None:
        return 0
    if state.get("stage") != request.stage:
        raise TrainingError(f"{latest}: a checkpoint of stage {state.get('stage')!r}, not "
                            f"{request.stage!r}; use a fresh output URI per stage")
    if not same_inputs(request, key, state.get("inputs_key", key), lambda: state.get("config")):
        raise TrainingError(f"{latest}: a checkpoint of this stage from other inputs (config, data or starting "
                            "models differ); use a fresh output URI or remove it")
    stage.model.load_state_dict(state["model"])
    stage.student_opt.load_state_dict(state["optimizer"])
    stage.scheduler.load_state_dict(state["scheduler"])
    if stage.distiller is not None:
        try:
            stage.distiller.load_distillation_state(state["distiller"])
        except ValueError as exc:
            raise TrainingError(f"{latest}: {exc}; use a fresh output URI") from None
        if stage.assistant_opt is not None:
            stage.assistant_opt.load_state_dict(state["assistant_optimizer"])
    return int(state["iteration"])


def save_checkpoint(stage: Stage, request: StageRequest, key: str, iteration: int) -> dict:
    """Atomically, plain tensors only (loaded with weights_only=True); keeps the two newest."""
    state = {"format": ckpt.CHECKPOINT_FORMAT, "stage": request.stage, "iteration": iteration,
             "config": request.config, "inputs_key": key, "spec": stage.spec.to_dict(),
             "model": {k: v.detach().cpu() for k, v in stage.model.state_dict().items()},
             "optimizer": stage.student_opt.state_dict(), "scheduler": stage.scheduler.state_dict()}
    if stage.distiller is not None:
        # The distiller's state minus the student (already under "model"); the teacher is never in it.
        state["distiller"] = {k: v.detach().cpu() for k, v in stage.distiller.state_dict().items()
                              if not k.startswith("student.")}
        if stage.assistant_opt is not None:
            state["assistant_optimizer"] = stage.assistant_opt.state_dict()
    ckpt.save(state, ckpt.checkpoint_uri(request.out, iteration))
    ckpt.prune_checkpoints(request.out)
    return state


def run_stage(request: StageRequest, report: Callable[[dict], None] | None = None,
              hooks: StageHooks | None = None) -> dict:
    """Run (or resume) one stage to its end; returns its summary. ``report`` gets metrics on rank 0 every log
    interval; ``hooks`` see every checkpoint on every rank and may hand one back to resume from."""
    hooks = hooks or StageHooks()
    if request.stage not in STAGES:
        raise TrainingError(f"unknown stage {request.stage!r}; one of {STAGES}")
    cfg = config_from_dict(request.config)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    key = inputs_key(request)
    done = completed_summary(request, key)
    if done is not None:
        log.info("%s: stage %s already complete with these inputs; reusing it", request.out, request.stage)
        return done
    rank, world = rank_and_world()
    device = _device(cfg)
    torch.manual_seed(cfg.train.seed + rank)
    dataset = training_images(request, cfg)
    stage = build_stage(request, cfg, cfg.model.num_classes or dataset.num_classes, device, world, dataset)
    start = resume(stage, request, key, hooks.restore())
    if start and rank == 0:
        log.info("resuming %s at %s from iteration %d", request.stage, request.out, start)
    student, assistant = stage_iterations(cfg, request.stage)
    end = min(student + assistant, request.stop_at) if request.stop_at else student + assistant
    metrics = MetricsLog(request.out, enabled=rank == 0)
    tracker = _tracker(request, key) if rank == 0 else None

    def checkpoint(iteration: int, values: dict) -> None:
        state = None
        if rank == 0:
            state = save_checkpoint(stage, request, key, iteration)
            metrics.flush()
            if tracker is not None:
                tracker.log_metrics(values, iteration)
        hooks.checkpointed(iteration, {"iteration": iteration, **values}, state)

    loop_hooks, logged = _stage_hooks(stage, request, cfg, (rank, world), (start, end), metrics, checkpoint, report)
    started = time.perf_counter()
    try:
        loop.train(stage, request, cfg, dataset, device, (rank, world), (start, end), loop_hooks)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")  # a rerun resumes this run
        raise
    last = logged.last if logged is not None else {}
    elapsed = time.perf_counter() - started
    summary = {"stage": request.stage, "iterations": end, "resumed_from": start, "workers": world,
               "wall_s": round(elapsed, 2), "it_per_s": round((end - start) / max(elapsed, 1e-9), 4),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "device": str(device), "train_images": len(dataset), "inputs_key": key, "spec": stage.spec.to_dict()}
    checkpoint(end, last)
    if rank == 0:
        categories = [{"id": c, "name": dataset.category_names[c]} for c in dataset.category_ids]
        ckpt.save_model(stage.model, stage.spec, request.out, categories,
                        {"stage": request.stage, "config": request.config, "iterations": end})
        storage.write_json(storage.join(request.out, "summary.json"), summary)
        metrics.close()
        if tracker is not None:
            tracker.log_artifact(ckpt.model_uri(request.out), "model")
            tracker.log_artifact(storage.join(request.out, "summary.json"), "model")
            tracker.finish()
    if world > 1:
        dist.barrier()
    return summary


def _tracker(request: StageRequest, key: str) -> Tracker | None:
    """The stage's MLflow run when ``MLFLOW_TRACKING_URI`` is set (scalekd.tracking), else None."""
    tags = {"scalekd.stage": request.stage, "scalekd.out": request.out, "scalekd.inputs_key": key}
    params = {"stage": request.stage, "data": request.data, "teacher": request.teacher,
              "student_init": request.student_init, **flat_params(request.config)}
    return Tracker.start(f"{request.stage} {request.out}", tags, params)


def training_images(request: StageRequest, cfg: Config) -> CocoDetection:
    """The stage's training set: every training image, or its share of them under ``data.teacher_holdout``."""
    share = cfg.data.teacher_holdout
    dataset = dataset_from_root(request.data, cfg.data.train_split, keep=stage_images(request.stage, share))
    if not len(dataset):  # only a share can empty it: an annotation file without images is refused on loading
        raise DataError(f"data.teacher_holdout={share} leaves the {request.stage} stage none of the training images "
                        f"of {request.data} (split by source image): lower it or add images")
    if not dataset.counts.objects:  # every image would be background: a detector that learns to find nothing
        raise DataError(f"{request.data}: the {cfg.data.train_split} split of the {request.stage} stage holds no "
                        "objects (crowd regions and dropped boxes do not count); check the annotations")
    if share and rank_and_world()[0] == 0:
        log.info("%s: trains on %d training images (data.teacher_holdout=%s)", request.stage, len(dataset), share)
    return dataset


def _stage_hooks(stage: Stage, request: StageRequest, cfg: Config, rank_world: tuple[int, int],
                 span: tuple[int, int], log: MetricsLog, save: Callable[[int, dict], None],
                 report: Callable[[dict], None] | None) -> tuple[list[LoopHook], Metrics | None]:
    """The stage's hooks in the order they run after a step: metrics, progress, checkpoints, the tests' faults."""
    rank, world = rank_world
    hooks: list[LoopHook] = []
    if request.stage == "warmup":
        hooks.append(BackboneFreeze(stage.model, cfg.train.freeze_backbone_iterations))
    metrics = None
    if rank == 0:
        metrics = Metrics(log, report, cfg.train.log_interval, span, cfg.train.batch_size * world,
                          lambda: stage.student_opt.param_groups[0]["lr"])
        hooks += [metrics, Progress(request.stage, span, metrics)]
    hooks.append(Checkpoints(save, cfg.train.checkpoint_interval, span[1]))
    faults = FaultInjection.from_environment(request.out, rank, world)
    return hooks + ([faults] if faults is not None else []), metrics
