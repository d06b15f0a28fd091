"""One distillation iteration, whatever the method: the frozen teacher's forward (at 2x) -> the student's forward ->
the method's terms (ScaleKD's assistant steps on the ground truth first) -> the student's step on L_det plus the
method's weighted terms.

The methods (scalekd/distill/methods/) own their modules, losses and weights; this class runs the teacher and the
student and steps the student, so ScaleKD, the baselines and every ablation share one loop and one set of logs.
Nothing here knows about Ray: gradient averaging across workers comes in as a callable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from scalekd.config import Config
from scalekd.data.transforms import DualBatch
from scalekd.distill.methods import DistillMethod, method_class
from scalekd.geometry import pair_teacher_maps
from scalekd.models.parts import DetectorParts, Forward

GradSync = Callable[[list[nn.Parameter]], None]
PhaseTimer = Callable[[str], contextlib.AbstractContextManager]


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _no_sync(params: list[nn.Parameter]) -> None:
    return None


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN or infinite; raised before any parameter moves."""

    def __init__(self, term: str, value: float):
        self.term, self.value = term, value
        super().__init__(f"loss term '{term}' is {value}")


def check_finite(terms: dict[str, Tensor]) -> None:
    """One host sync for all terms; the culprit is looked up only when something is not finite."""
    if not terms or bool(torch.isfinite(torch.stack([v.detach().float().sum() for v in terms.values()])).all()):
        return
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(name, float(value.detach().float().sum()))


@dataclass
class Optimizers:
    student: torch.optim.Optimizer
    assistant: torch.optim.Optimizer | None
    grad_clip: float = 10.0
    sync: GradSync = _no_sync


@contextlib.contextmanager
def frozen_batchnorm_statistics(module: nn.Module):
    """BatchNorm layers of ``module`` in eval mode (running statistics used, not updated) for the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def autocast_context(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """CUDA autocast at ``dtype``, or nothing (full precision) when it is None."""
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def student_update(total: Tensor, params: list[nn.Parameter], opt: Optimizers) -> None:
    """Backward, average gradients across workers, clip, step: the student optimizer's update."""
    opt.student.zero_grad(set_to_none=True)
    total.backward()
    params = [p for p in params if p.requires_grad]
    opt.sync(params)
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], opt.grad_clip)
    opt.student.step()


class Distiller(nn.Module):
    """Holds the student, the frozen teacher and the distillation method with its modules."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.student_parts = DetectorParts(student, cfg.experimental.assigner, cfg.experimental.atss_topk)
        # The teacher is frozen and kept out of this module's state_dict and parameters().
        self._teacher = [teacher] if teacher is not None else []
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self.teacher_parts = DetectorParts(teacher, cfg.experimental.assigner, cfg.experimental.atss_topk)
        kind = method_class(cfg.distill.method)
        if kind.needs_teacher() and teacher is None:
            raise ValueError(f"distill.method={cfg.distill.method} needs a teacher")
        self.method: DistillMethod = kind(self)
        # Registered here, under the method's names, so checkpoints hold them as "sdf.", "csa.", "fitnet." ...
        for name, module in self.method.modules().items():
            self.add_module(name, module)

    def load_distillation_state(self, state: dict[str, Tensor]) -> None:
        """Load what a checkpoint holds besides the student (the method's modules); raises ValueError when it was
        saved under another distillation config."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("student.") for k in missing):
            raise ValueError(f"distillation modules do not match this config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._teacher:
            self._teacher[0]._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()  # teacher discipline: always eval mode
        return self

    def student_parameters(self) -> list[nn.Parameter]:
        """What the student optimizer steps: the student plus the method's adapters (SDF, FitNet's)."""
        params = [p for p in self.student.parameters()]
        for module in self.method.student_modules():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def assistant_param_groups(self) -> list[dict]:
        """The groups of the method's own optimizer (ScaleKD's assistant); empty: none."""
        return self.method.assistant_param_groups()

    def assistant_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.assistant_param_groups() for p in group["params"]]

    @property
    def assistant_trains(self) -> bool:
        """The method has an assistant with something to train (its optimizer has a group)."""
        return bool(self.assistant_param_groups())

    # ------------------------------------------------------------------------------------------------
    def train_step(self, batch: DualBatch, opt: Optimizers, autocast: torch.dtype | None = None,
                   phase: PhaseTimer | None = None, kd_scale: float = 1.0) -> dict[str, Tensor]:
        """One iteration; returns the named, unweighted loss terms (detached) for logging.

        ``phase(name)`` (a context manager, see benchmarks/cost.py) times the parts of the iteration; ``kd_scale``
        multiplies the method's weights (``distill.kd_ramp_iterations``), never the detection loss.
        """
        phase = phase or _no_phase
        amp = autocast_context(autocast)
        with phase("teacher"), amp:
            teacher = self._teacher_features(batch)
        with phase("student_forward"), amp:
            student_out = self.student_parts.forward_train(batch.student_images, batch.student_targets)
        terms = {f"det/{k}": v for k, v in student_out.losses.items()}
        distilled, logs = self.method.losses(student_out, teacher, opt, amp, phase)
        terms.update(distilled)
        weights = {name: kd_scale * w for name, w in self.method.weights.items()}
        check_finite(terms)
        with phase("student_backward_step"):
            total = cast(Tensor, sum(weights.get(name, 1.0) * value.float() for name, value in terms.items()))
            student_update(total, self.student_parameters(), opt)
        logs.update({k: v.detach() for k, v in terms.items()})
        logs["loss/total"] = total.detach()
        return logs

    def assistant_warmup_step(self, batch: DualBatch, opt: Optimizers,
                              autocast: torch.dtype | None = None) -> dict[str, Tensor]:
        """The method's assistant alone steps; the student's weights do not move (``distill.csa.warmup_iterations``)."""
        amp = autocast_context(autocast)
        with torch.no_grad(), amp, frozen_batchnorm_statistics(self.student):
            teacher = self._teacher_features(batch)
            if teacher is None:
                raise ValueError(f"distill.method={self.cfg.distill.method}: its assistant needs the teacher's maps")
            _, teacher_maps = teacher
            student_out = self.student_parts.forward_train(batch.student_images, batch.student_targets)
        _, logs = self.method.assistant_step(student_out, teacher_maps, opt, amp, _no_phase)
        logs["loss/total"] = cast(Tensor, sum(logs.values()))
        return logs

    def teacher_maps(self, images_2x: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The frozen teacher's C5 and its FPN maps paired with the student's levels (``distill.pairing``)."""
        with torch.no_grad():
            c5, maps = self.teacher_parts.teacher_features(images_2x)
        return c5, self._pair(maps)

    def _pair(self, maps: list[Tensor]) -> list[Tensor]:
        # Every detector we build has five FPN levels (P3-P7, P2-P6, or P2-P5 and the pooled P6).
        return pair_teacher_maps(maps, 5, self.student_parts.min_level, self.teacher_parts.min_level,
                                 self.cfg.distill.pairing)

    def _teacher_features(self, batch: DualBatch) -> tuple[Tensor, list[Tensor]] | None:
        """What the method reads from the teacher: nothing, its maps at 2x, or (same-level OD and CrossKD, which
        compare anchor by anchor) its maps at the student's own size."""
        if not self.method.needs_teacher():
            return None
        if self.method.teacher_at_student_size(self.cfg):
            with torch.no_grad():
                return self.teacher_parts.teacher_features(batch.student_images, keep_size=True)
        return self.teacher_maps(batch.teacher_images)

    @torch.no_grad()
    def teacher_predictions(self, teacher_maps: list[Tensor], student_out: Forward) -> dict[str, Tensor]:
        """OD's targets: the teacher's head on its paired maps, read on the student's anchors or proposals (with
        scale-aligned pairing, the 2x teacher's P_{l+1} predictions, which are on the student's own anchors)."""
        return self.teacher_parts.predict(teacher_maps, student_out.fpn_names, student_out.context)
