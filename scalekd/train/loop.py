"""The one worker loop behind every stage: teacher (detection loss at 2x), warm-up (student alone,
backbone frozen for the first F iterations), distill (the Distiller, from the warm student and the
trained teacher).

It runs in a plain process or as a Ray Train worker: with torch.distributed initialised (Ray's
TorchTrainer does it) gradients are averaged across workers with one all-reduce per optimizer per
iteration (DDP's semantics, two optimizers and two backward passes for the distill stage), and data
is sharded with a DistributedSampler. Rank 0 writes checkpoints, logs and the model file.
"""

from __future__ import annotations

import hashlib
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
from torch.utils.data import DataLoader, DistributedSampler

from scalekd import storage
from scalekd.config import Config, config_from_dict
from scalekd.data.coco import CocoDetection, DataError, dataset_from_root
from scalekd.data.holdout import stage_images
from scalekd.data.transforms import DualBatch, DualResolutionCollate
from scalekd.distill.methods import method_class
from scalekd.distill.distiller import (Distiller, NonFiniteLossError, Optimizers, autocast_context, check_finite,
                                      student_update)
from scalekd.geometry import DetectorSpec, student_spec, teacher_spec
from scalekd.models.detectors import build_detector
from scalekd.models.parts import DetectorParts
from scalekd.train import checkpoint as ckpt
from scalekd.train.keys import inputs_key
from scalekd.train.hooks import (BackboneFreeze, Checkpoints, FaultInjection, LoopHook, Metrics, MetricsLog,
                                 Progress)
from scalekd.train.memory_format import use_channels_last
from scalekd.train.schedule import build_scheduler

log = logging.getLogger(__name__)
STAGES = ("teacher", "warmup", "distill")
# Fault-injection hooks for the tests (a worker dies / a batch turns to NaN at an iteration).


class TrainingError(RuntimeError):
    pass


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


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_grad_sync(world: int) -> Callable[[list[nn.Parameter]], None]:
    def sync(params: list[nn.Parameter]) -> None:
        if world == 1 or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    return sync


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _data_seed(train_seed: int, rank: int, stream: str, epoch: int, use: str) -> int:
    """The seed of one rank's batch order or flips (``use``) in one epoch of one stream, from these alone.

    Why: both used to draw from torch's global stream, which ``build_stage`` had already drawn from to initialise
    SDF and the assistant, so two variants of one seed trained on different batches and flips and a comparison
    "paired by seed" never paired the data (found on KIT, where it made the OD-vs-ScaleKD gap unreadable)."""
    digest = hashlib.sha256(f"{train_seed}/{rank}/{stream}/{epoch}/{use}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _infinite_batches(loader: DataLoader, sampler: DistributedSampler | None, collate: DualResolutionCollate,
                      seed: Callable[[int, str], int], epoch: int):
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader.generator.manual_seed(seed(epoch, "order"))
        collate.reseed(seed(epoch, "flip"))
        yield from loader
        epoch += 1


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
    if summary.get("inputs_key") != (key or inputs_key(request)) or summary.get("stage") != request.stage:
        raise TrainingError(f"{request.out} holds a finished {summary.get('stage')} stage from other inputs (stage, "
                            "config, data or starting models differ); use a fresh output URI or remove it")
    return summary if summary.get("iterations") == end else None


@dataclass
class _Stage:
    """One stage's models and optimizers, built from the request."""

    spec: DetectorSpec
    model: nn.Module
    distiller: Distiller | None
    student_opt: torch.optim.Optimizer
    scheduler: object
    assistant_opt: torch.optim.Optimizer | None
    opt: Optimizers
    parts: DetectorParts  # the model's step-by-step forward and loss, with the configured assignment


def _check_categories(model_uri: str, blob: dict, dataset: CocoDetection | None) -> None:
    from scalekd.eval.evaluate import check_categories

    if dataset is not None:
        check_categories(model_uri, blob.get("categories"), dataset, use="distill with it")


def build_stage(request: StageRequest, cfg: Config, num_classes: int, device: torch.device, world: int,
                dataset: CocoDetection | None = None) -> _Stage:
    """The stage's model, distiller and optimisers; a distill stage's teacher and warm student must have been
    trained on ``dataset``'s categories (ids and names), when it is given."""
    spec = teacher_spec(cfg, num_classes) if request.stage == "teacher" else student_spec(cfg, num_classes)
    model = build_detector(spec)
    if cfg.model.detector == "retinanet":  # torchvision reads its box loss from this attribute (its v2 recipe)
        model.head.regression_head._loss_type = cfg.model.box_loss
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
        (distiller or model).to(memory_format=torch.channels_last)  # the distiller carries the teacher along
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
             else DetectorParts(model, cfg.model.assigner, cfg.model.atss_topk))
    return _Stage(spec, model, distiller, student_opt, scheduler, assistant_opt, opt, parts)


def resume(stage: _Stage, request: StageRequest, key: str, kept: dict | None = None) -> int:
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
    if state.get("inputs_key", key) != key:
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


def save_checkpoint(stage: _Stage, request: StageRequest, key: str, iteration: int) -> dict:
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
    rank, world = _dist()
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

    def checkpoint(iteration: int, values: dict) -> None:
        state = None
        if rank == 0:
            state = save_checkpoint(stage, request, key, iteration)
            metrics.flush()
        hooks.checkpointed(iteration, {"iteration": iteration, **values}, state)

    loop_hooks, logged = _stage_hooks(stage, request, cfg, (rank, world), (start, end), metrics, checkpoint, report)
    started = time.perf_counter()
    _train(stage, request, cfg, dataset, device, (rank, world), (start, end), loop_hooks)
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
    if world > 1:
        dist.barrier()
    return summary


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
    if share and _dist()[0] == 0:
        log.info("%s: trains on %d training images (data.teacher_holdout=%s)", request.stage, len(dataset), share)
    return dataset


def _loader(request: StageRequest, cfg: Config, dataset, rank_world: tuple[int, int], stream: str, done: int):
    """Endless batches of one stream, from the epoch that holds its ``done``-th batch.

    A distill stage has two streams: ``assistant`` for the assistant-only warm-up and ``student`` for the
    student's iterations, so the student's i-th batch is the same whatever warm-up a variant runs before it (and
    whatever modules it initialised). The other stages have the ``student`` stream alone. With
    ``data.loader_workers`` > 0 flips come from the workers' streams, seeded by the loader's generator: still
    the same for every variant, but a resumed run's flips are not an unbroken run's."""
    rank, world = rank_world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed) \
        if world > 1 else None
    collate = DualResolutionCollate(cfg.data.student_size if request.stage != "teacher" else cfg.teacher_size,
                                    cfg.data.teacher_scale, cfg.data.max_size_ratio, cfg.data.hflip_prob,
                                    with_teacher=request.stage == "distill")
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                        collate_fn=collate, num_workers=cfg.data.loader_workers, drop_last=False,
                        persistent_workers=cfg.data.loader_workers > 0, generator=torch.Generator())

    def seed(epoch: int, use: str) -> int:
        return _data_seed(cfg.train.seed, rank, stream, epoch, use)

    return _infinite_batches(loader, sampler, collate, seed, epoch=done // max(1, len(loader)))


def _train(stage: _Stage, request: StageRequest, cfg: Config, dataset, device: torch.device,
           rank_world: tuple[int, int], span: tuple[int, int], hooks: list[LoopHook]) -> None:
    """Iterations ``span`` = [start, end): a batch and a step each (the assistant's alone first, where the method has
    one), the scheduler after each student step; ``hooks`` do everything else."""
    start, end = span
    assistant_warmup = stage_iterations(cfg, request.stage)[1]
    student_batches = _loader(request, cfg, dataset, rank_world, "student", max(0, start - assistant_warmup))
    assistant_batches = _loader(request, cfg, dataset, rank_world, "assistant", start) \
        if start < assistant_warmup else None
    autocast = torch.bfloat16 if (device.type == "cuda" and cfg.train.amp) else None
    stage.model.train()
    if stage.distiller is not None:
        stage.distiller.train()
    for iteration in range(start, end):
        if iteration == assistant_warmup:
            assistant_batches = None  # its loader (and any workers) go
        batch: DualBatch = next(assistant_batches if iteration < assistant_warmup else student_batches).to(device)
        for hook in hooks:
            hook.before_step(iteration, batch)
        terms = _step(stage, request, batch, iteration, assistant_warmup, autocast)
        if iteration >= assistant_warmup:
            stage.scheduler.step()
        for hook in hooks:
            hook.after_step(iteration + 1, terms)
    for hook in hooks:
        hook.after_train()


def _stage_hooks(stage: _Stage, request: StageRequest, cfg: Config, rank_world: tuple[int, int],
                 span: tuple[int, int], log: MetricsLog, save: Callable[[int, dict], None],
                 report: Callable[[dict], None] | None) -> tuple[list[LoopHook], Metrics | None]:
    """The stage's hooks in the order they run after a step: metrics, progress, checkpoints, the tests' faults."""
    (rank, world), hooks = rank_world, []
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


def _step(stage: _Stage, request: StageRequest, batch: DualBatch, iteration: int, assistant_warmup: int,
          autocast: torch.dtype | None) -> dict:
    try:
        if iteration < assistant_warmup:
            return stage.distiller.assistant_warmup_step(batch, stage.opt, autocast)
        if stage.distiller is not None:
            ramp = kd_ramp(iteration - assistant_warmup, stage.distiller.cfg.distill.kd_ramp_iterations)
            return stage.distiller.train_step(batch, stage.opt, autocast, kd_scale=ramp)
        return detection_step(stage.parts, batch.student_images, batch.student_targets, stage.opt, autocast)
    except NonFiniteLossError as exc:
        good = ckpt.latest_checkpoint(request.out)
        raise TrainingError(f"stage {request.stage}, iteration {iteration}: loss term '{exc.term}' is "
                            f"{exc.value}; stopped before the update. Last good checkpoint: "
                            f"{good or 'none yet'}. Check the data of this batch and the learning rate.") from None


def kd_ramp(student_iteration: int, ramp_iterations: int) -> float:
    """The factor on alpha, beta and gamma at a student iteration (from 0): (i + 1) / N over the first N, then 1
    (``distill.kd_ramp_iterations``; not in the paper)."""
    if ramp_iterations <= 0:
        return 1.0
    return min(1.0, (student_iteration + 1) / ramp_iterations)


def detection_step(parts: DetectorParts, images: list, targets: list, opt: Optimizers,
                   autocast: torch.dtype | None) -> dict:
    """A plain supervised step: the detector's own loss (teacher and warm-up stages), assigned as the distill stage
    assigns it (``DetectorParts``: ``model.assigner`` reaches every stage, not only distillation)."""
    amp = autocast_context(autocast)
    with amp:
        losses = parts.forward_train(images, targets).losses
    terms = {f"det/{k}": v for k, v in losses.items()}
    check_finite(terms)
    total = sum(v.float() for v in losses.values())
    student_update(total, list(parts.model.parameters()), opt)
    return {**{k: v.detach() for k, v in terms.items()}, "loss/total": total.detach()}
