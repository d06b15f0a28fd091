"""The one worker loop behind every stage: teacher (detection loss at 2x), warm-up (student alone,
backbone frozen for the first F iterations), distill (the Distiller, from the warm student and the
trained teacher).

It runs in a plain process or as a Ray Train worker: with torch.distributed initialised (Ray's
TorchTrainer does it) gradients are averaged across workers with one all-reduce per optimizer per
iteration (DDP's semantics, two optimizers and two backward passes for the distill stage), and data
is sharded with a DistributedSampler. Rank 0 writes checkpoints, logs and the model file.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from scalekd import storage
from scalekd.config import Config, config_from_dict
from scalekd.data.coco import dataset_from_root
from scalekd.data.transforms import DualBatch, DualResolutionCollate
from scalekd.distill.distiller import (Distiller, NonFiniteLossError, Optimizers, autocast_context, check_finite,
                                      student_update)
from scalekd.models.detectors import DetectorSpec, backbone_parameters, build_detector
from scalekd.train import checkpoint as ckpt
from scalekd.train.schedule import build_scheduler

log = logging.getLogger(__name__)
STAGES = ("teacher", "warmup", "distill")
# Fault-injection hooks for the tests (a worker dies / a batch turns to NaN at an iteration).
FAULT_ENV = "SCALEKD_FAULT_AT_ITERATION"
POISON_ENV = "SCALEKD_POISON_AT_ITERATION"


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


def student_spec(cfg: Config, num_classes: int) -> DetectorSpec:
    size = cfg.data.student_size
    min_level = cfg.model.student_min_level if cfg.one_stage else 3
    return DetectorSpec(cfg.model.detector, cfg.model.student_backbone, num_classes, cfg.model.fpn_channels,
                        size, int(round(size * cfg.data.max_size_ratio)), cfg.model.anchor_scale, min_level)


def teacher_spec(cfg: Config, num_classes: int) -> DetectorSpec:
    """At teacher_scale x the student's size, max size and padding, so both views' grids line up exactly."""
    scale = cfg.data.teacher_scale
    max_size = int(round(int(round(cfg.data.student_size * cfg.data.max_size_ratio)) * scale))
    return DetectorSpec(cfg.model.detector, cfg.model.teacher_backbone, num_classes, cfg.model.fpn_channels,
                        cfg.teacher_size, max_size, cfg.model.anchor_scale, 3, cfg.teacher_size_divisible)


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


class MetricsLog:
    """JSONL and TensorBoard events, written locally and mirrored to the stage's output URI."""

    def __init__(self, out: str, enabled: bool):
        self.out, self.enabled = out, enabled
        if not enabled:
            return
        self.local = out if not storage.is_s3(out) else tempfile.mkdtemp(prefix="scalekd-logs-")
        os.makedirs(self.local, exist_ok=True)
        self.jsonl_path = os.path.join(self.local, "metrics.jsonl")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def write(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(storage.json_text({"iteration": iteration, **values}))
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, iteration)

    def flush(self) -> None:
        if not self.enabled:
            return
        self.tb.flush()
        if storage.is_s3(self.out):
            storage.upload_dir(self.local, self.out)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.tb.close()


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _infinite_batches(loader: DataLoader, sampler: DistributedSampler | None, epoch: int):
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_stage(request: StageRequest, report: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) one stage to its end; returns its summary. ``report`` gets metrics on rank 0."""
    if request.stage not in STAGES:
        raise TrainingError(f"unknown stage {request.stage!r}; one of {STAGES}")
    cfg = config_from_dict(request.config)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    rank, world = _dist()
    device = _device(cfg)
    torch.manual_seed(cfg.train.seed + rank)
    dataset = dataset_from_root(request.data, cfg.data.train_split)
    num_classes = cfg.model.num_classes or dataset.num_classes
    student_iterations = {"teacher": cfg.train.teacher_iterations, "warmup": cfg.train.warmup_iterations,
                          "distill": cfg.train.distill_iterations}[request.stage]
    # Iterations in which only the assistant steps come first and do not count against the student's budget.
    assistant_warmup = (cfg.distill.csa.warmup_iterations if request.stage == "distill" and
                        cfg.distill.method == "scalekd" and cfg.distill.csa.enabled else 0)
    total = student_iterations + assistant_warmup
    if storage.exists(ckpt.model_uri(request.out)) and storage.exists(storage.join(request.out, "summary.json")):
        summary = json.loads(storage.read_text(storage.join(request.out, "summary.json")))
        if summary.get("iterations") == (min(total, request.stop_at) if request.stop_at else total) \
                and summary.get("stage") == request.stage:
            log.info("%s: stage %s already complete; nothing to do", request.out, request.stage)
            return summary

    spec = teacher_spec(cfg, num_classes) if request.stage == "teacher" else student_spec(cfg, num_classes)
    model = build_detector(spec)
    distiller = None
    if request.stage == "distill":
        if not request.student_init or not request.teacher:
            raise TrainingError("the distill stage needs --teacher MODEL and --student MODEL (warm-up output)")
        warm, _ = ckpt.load_model(request.student_init, expect=spec)
        model.load_state_dict(warm.state_dict())
        teacher = None
        if cfg.distill.method != "none":
            teacher, _ = ckpt.load_model(request.teacher, expect=teacher_spec(cfg, num_classes))
        distiller = Distiller(model, teacher, cfg).to(device)
        params = distiller.student_parameters()
    else:
        params = list(model.parameters())
    model.to(device)
    if cfg.train.channels_last:
        (distiller or model).to(memory_format=torch.channels_last)  # the distiller carries the teacher along
    student_opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                  weight_decay=cfg.train.weight_decay)
    scheduler = build_scheduler(student_opt, student_iterations, cfg.train.lr_warmup_iterations, cfg.train.lr_steps,
                                cfg.train.lr_gamma)
    assistant_opt = None
    if distiller is not None and distiller.csa is not None:
        assistant_opt = torch.optim.Adam(distiller.assistant_parameters(), lr=cfg.distill.csa.lr,
                                         weight_decay=cfg.distill.csa.weight_decay)
    opt = Optimizers(student_opt, assistant_opt, cfg.train.grad_clip, make_grad_sync(world))

    start = 0
    latest = ckpt.latest_checkpoint(request.out)
    if latest is not None:
        state = ckpt.load(latest)
        if state.get("stage") != request.stage:
            raise TrainingError(f"{latest}: a checkpoint of stage {state.get('stage')!r}, not "
                                f"{request.stage!r}; use a fresh output URI per stage")
        model.load_state_dict(state["model"])
        student_opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if distiller is not None:
            try:
                distiller.load_distillation_state(state["distiller"])
            except ValueError as exc:
                raise TrainingError(f"{latest}: {exc}; use a fresh output URI") from None
            if assistant_opt is not None:
                assistant_opt.load_state_dict(state["assistant_optimizer"])
        start = int(state["iteration"])
        if rank == 0:
            log.info("resuming %s from %s (iteration %d of %d)", request.stage, latest, start, total)

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed) \
        if world > 1 else None
    collate = DualResolutionCollate(cfg.data.student_size if request.stage != "teacher" else cfg.teacher_size,
                                    cfg.data.teacher_scale, cfg.data.max_size_ratio, cfg.data.hflip_prob,
                                    with_teacher=request.stage == "distill")
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                        collate_fn=collate, num_workers=cfg.data.loader_workers, drop_last=False,
                        persistent_workers=cfg.data.loader_workers > 0)
    batches = _infinite_batches(loader, sampler, epoch=start // max(1, len(loader)))
    metrics = MetricsLog(request.out, enabled=rank == 0)
    autocast = torch.bfloat16 if (device.type == "cuda" and cfg.train.amp) else None

    def save_checkpoint(iteration: int) -> None:
        if rank != 0:
            return
        state = {"format": ckpt.CHECKPOINT_FORMAT, "stage": request.stage, "iteration": iteration,
                 "config": request.config, "spec": spec.to_dict(),
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": student_opt.state_dict(), "scheduler": scheduler.state_dict()}
        if distiller is not None:
            # The distiller's state minus the student (already under "model"); the teacher is never in it.
            state["distiller"] = {k: v.detach().cpu() for k, v in distiller.state_dict().items()
                                  if not k.startswith("student.")}
            if assistant_opt is not None:
                state["assistant_optimizer"] = assistant_opt.state_dict()
        ckpt.save(state, ckpt.checkpoint_uri(request.out, iteration))
        ckpt.prune_checkpoints(request.out)
        metrics.flush()

    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc=f"{request.stage}", unit="it", file=sys.stderr,
                        mininterval=2.0, dynamic_ncols=True, disable=os.environ.get("SCALEKD_NO_PROGRESS") == "1")
    model.train()
    if distiller is not None:
        distiller.train()
    frozen = False
    t0 = time.perf_counter()
    fault_at = int(os.environ.get(FAULT_ENV, "-1"))
    poison_at = int(os.environ.get(POISON_ENV, "-1"))
    end = min(total, request.stop_at) if request.stop_at else total
    for iteration in range(start, end):
        if request.stage == "warmup":
            want_frozen = iteration < cfg.train.freeze_backbone_iterations
            if want_frozen != frozen:
                for p in backbone_parameters(model):
                    p.requires_grad_(not want_frozen)
                frozen = want_frozen
        batch: DualBatch = next(batches).to(device)
        if iteration == poison_at:
            batch.student_images[0] = batch.student_images[0] * float("nan")
            if batch.teacher_images:
                batch.teacher_images[0] = batch.teacher_images[0] * float("nan")
        try:
            if iteration < assistant_warmup:
                terms = distiller.assistant_warmup_step(batch, opt, autocast)
            elif distiller is not None:
                terms = distiller.train_step(batch, opt, autocast)
            else:
                images = batch.student_images
                terms = detection_step(model, images, batch.student_targets, opt, autocast)
        except NonFiniteLossError as exc:
            good = ckpt.latest_checkpoint(request.out)
            raise TrainingError(f"stage {request.stage}, iteration {iteration}: loss term '{exc.term}' is "
                                f"{exc.value}; stopped before the update. Last good checkpoint: "
                                f"{good or 'none yet'}. Check the data of this batch and the learning rate.") from None
        if iteration >= assistant_warmup:
            scheduler.step()
        done = iteration + 1
        if rank == 0 and (done % cfg.train.log_interval == 0 or done == end):
            elapsed = time.perf_counter() - t0
            values = {k: round(float(v), 6) for k, v in terms.items()}
            values.update(lr=student_opt.param_groups[0]["lr"], it_per_s=round((done - start) / elapsed, 4),
                          images_per_s=round((done - start) * cfg.train.batch_size * world / elapsed, 3))
            metrics.write(done, values)
            if report is not None:
                report({"iteration": done, **values})
            progress.set_postfix(loss=f"{values.get('loss/total', 0.0):.3f}")
        if progress is not None:
            progress.update(1)
        if done % cfg.train.checkpoint_interval == 0 and done != end:
            save_checkpoint(done)
        if done == fault_at and rank == world - 1:
            marker = storage.join(request.out, ".fault-injected")
            if not storage.exists(marker):
                storage.write_text(marker, f"worker {rank} killed at iteration {done}\n")
                os._exit(17)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    summary = {"stage": request.stage, "iterations": end, "resumed_from": start, "workers": world,
               "wall_s": round(elapsed, 2), "it_per_s": round((end - start) / max(elapsed, 1e-9), 4),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "device": str(device), "spec": spec.to_dict()}
    if rank == 0:
        save_checkpoint(end)
        categories = [{"id": c, "name": dataset.category_names[c]} for c in dataset.category_ids]
        ckpt.save_model(model, spec, request.out, categories,
                        {"stage": request.stage, "config": request.config, "iterations": end})
        storage.write_json(storage.join(request.out, "summary.json"), summary)
        metrics.close()
    if world > 1:
        dist.barrier()
    return summary


def detection_step(model: nn.Module, images: list, targets: list, opt: Optimizers,
                   autocast: torch.dtype | None) -> dict:
    """A plain supervised step: the detector's own loss (teacher and warm-up stages)."""
    amp = autocast_context(autocast)
    with amp:
        losses = model(images, targets)
    terms = {f"det/{k}": v for k, v in losses.items()}
    check_finite(terms)
    total = sum(v.float() for v in losses.values())
    student_update(total, list(model.parameters()), opt)
    return {**{k: v.detach() for k, v in terms.items()}, "loss/total": total.detach()}
