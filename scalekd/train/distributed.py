"""Gradient averaging across Ray Train workers: DDP's semantics for a stage with two optimizers.

With torch.distributed initialised (Ray's TorchTrainer does it) each optimizer's gradients are averaged with one
all-reduce per iteration, so the distill stage's two backward passes (student, assistant) each sync once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """(this worker's rank, the number of workers): (0, 1) in a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_grad_sync(world: int) -> Callable[[list[nn.Parameter]], None]:
    def sync(params: list[nn.Parameter]) -> None:
        if world == 1 or not params:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all of them
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    return sync
