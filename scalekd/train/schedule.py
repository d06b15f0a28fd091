"""The detectors' usual learning-rate schedule, in iterations: linear warm-up, then step decay."""

from __future__ import annotations

import torch


def lr_factor(iteration: int, total: int, warmup: int, steps: tuple[float, ...], gamma: float) -> float:
    factor = 1.0
    if warmup > 0 and iteration < warmup:
        factor = 0.001 + (1.0 - 0.001) * iteration / warmup
    for fraction in steps:
        if iteration >= int(fraction * total):
            factor *= gamma
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, steps: tuple[float, ...],
                    gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, warmup, steps, gamma))
