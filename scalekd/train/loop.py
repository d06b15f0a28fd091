"""The training loop: a batch and a step per iteration, and hooks for everything else.

The step is the stage's: the assistant's alone during its warm-up, the Distiller's in a distill stage, the
detector's own loss otherwise. Checkpoints, metrics, progress, reports and the tests' faults are hooks
(``scalekd.train.hooks``) built by the stage (``scalekd.train.stage``); the loop reads no environment variable.
Batches come from a sampler seeded per stream and epoch, so variants of one seed see the same data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch.utils.data import DataLoader, DistributedSampler

from scalekd.config import Config
from scalekd.data.transforms import DualBatch, DualResolutionCollate
from scalekd.distill.distiller import NonFiniteLossError, Optimizers, autocast_context, check_finite, student_update
from scalekd.models.parts import DetectorParts
from scalekd.train import checkpoint as ckpt
from scalekd.train.hooks import LoopHook

if TYPE_CHECKING:
    from scalekd.train.stage import Stage, StageRequest


class TrainingError(RuntimeError):
    pass


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


def _loader(request: StageRequest, cfg: Config, dataset, rank_world: tuple[int, int], stream: str, done: int):
    """Endless batches of one stream, from the epoch that holds its ``done``-th batch.

    A distill stage has two streams: ``assistant`` for the assistant-only warm-up and ``student`` for the
    student's iterations, so the student's i-th batch is the same whatever warm-up a variant runs before it (and
    whatever modules it initialised). The other stages have the ``student`` stream alone. With
    ``data.loader_workers`` > 0 flips come from the workers' streams, seeded by the loader's generator: still
    the same for every variant, but a resumed run's flips are not an unbroken run's."""
    rank, world = rank_world
    sampler: DistributedSampler | None = None
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    collate = DualResolutionCollate(cfg.data.student_size if request.stage != "teacher" else cfg.teacher_size,
                                    cfg.data.teacher_scale, cfg.data.max_size_ratio, cfg.data.hflip_prob,
                                    with_teacher=request.stage == "distill")
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                        collate_fn=collate, num_workers=cfg.data.loader_workers, drop_last=False,
                        persistent_workers=cfg.data.loader_workers > 0, generator=torch.Generator())

    def seed(epoch: int, use: str) -> int:
        return _data_seed(cfg.train.seed, rank, stream, epoch, use)

    return _infinite_batches(loader, sampler, collate, seed, epoch=done // max(1, len(loader)))


def train(stage: Stage, request: StageRequest, cfg: Config, dataset, device: torch.device,
           rank_world: tuple[int, int], span: tuple[int, int], hooks: list[LoopHook]) -> None:
    """Iterations ``span`` = [start, end): a batch and a step each (the assistant's alone first, where the method has
    one), the scheduler after each student step; ``hooks`` do everything else."""
    start, end = span
    assistant_warmup = stage.assistant_iterations
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
        batches = student_batches
        if assistant_batches is not None and iteration < assistant_warmup:
            batches = assistant_batches
        batch: DualBatch = next(batches).to(device)
        for hook in hooks:
            hook.before_step(iteration, batch)
        terms = _step(stage, request, batch, iteration, assistant_warmup, autocast)
        if iteration >= assistant_warmup:
            stage.scheduler.step()
        for hook in hooks:
            hook.after_step(iteration + 1, terms)
    for hook in hooks:
        hook.after_train()


def _step(stage: Stage, request: StageRequest, batch: DualBatch, iteration: int, assistant_warmup: int,
          autocast: torch.dtype | None) -> dict:
    distiller = stage.distiller
    try:
        if distiller is None:
            return detection_step(stage.parts, batch.student_images, batch.student_targets, stage.opt, autocast)
        if iteration < assistant_warmup:
            return distiller.assistant_warmup_step(batch, stage.opt, autocast)
        ramp = kd_ramp(iteration - assistant_warmup, distiller.cfg.distill.kd_ramp_iterations)
        return distiller.train_step(batch, stage.opt, autocast, kd_scale=ramp)
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
    assigns it (``DetectorParts``: ``experimental.assigner`` reaches every stage, not only distillation)."""
    amp = autocast_context(autocast)
    with amp:
        losses = parts.forward_train(images, targets).losses
    terms = {f"det/{k}": v for k, v in losses.items()}
    check_finite(terms)
    total = cast(torch.Tensor, sum(v.float() for v in losses.values()))
    student_update(total, list(parts.model.parameters()), opt)
    return {**{k: v.detach() for k, v in terms.items()}, "loss/total": total.detach()}
