"""What every distillation method is: its facts for the config (class attributes and class methods) and, once built
for a distiller, its modules and its loss terms for one iteration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor, nn

    from scalekd.config import Config
    from scalekd.distill.distiller import Distiller, Optimizers
    from scalekd.models.parts import Forward

PhaseTimer = Callable[[str], contextlib.AbstractContextManager]
# A problem a method finds in a config: (field, value, what it must be), raised by the config's validation.
Problem = tuple[str, object, str]

_REGISTRY: dict[str, type[DistillMethod]] = {}


def register(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: ``cls`` answers ``distill.method=cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two distillation methods named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[DistillMethod]]:
    return dict(_REGISTRY)


class DistillMethod:
    """One distillation method. The distiller runs the teacher and the student and steps the student on the
    detection loss plus ``losses``' terms at ``weights``; the method owns everything in between.

    Subclasses set ``name``, and ``teacher_input``: what they read from the frozen teacher, ``"none"``, ``"2x"``
    (its C5 and its FPN maps at 2x, paired with the student's levels by ``distill.pairing``) or ``"paired"`` (2x,
    except with ``distill.pairing=same_level``, where the teacher sees the student's own size: Chen et al.'s
    anchor-by-anchor comparison)."""

    name: ClassVar[str]
    teacher_input: ClassVar[str] = "2x"

    # ---- facts for the config, read without building anything -------------------------------------------------
    @classmethod
    def needs_teacher(cls) -> bool:
        return cls.teacher_input != "none"

    @classmethod
    def teacher_at_student_size(cls, cfg: Config) -> bool:
        return cls.teacher_input == "paired" and cfg.distill.pairing == "same_level"

    @classmethod
    def default_weights(cls, paper: tuple[float, float, float]) -> tuple[float, float, float]:
        """(alpha, beta, gamma) where the config leaves them null; ``paper``: the paper's for the detector family."""
        return paper

    @classmethod
    def assistant_iterations(cls, cfg: Config) -> int:
        """Iterations in which only the method's assistant trains, before the student's (none by default)."""
        return 0

    @classmethod
    def cross_head_possible(cls, cfg: Config) -> bool:
        """Whether CrossKD's cross-head terms can be added beside this method's own (``distill.cross_head_weight``)."""
        return False

    @classmethod
    def problems(cls, cfg: Config) -> Iterator[Problem]:
        """What in ``cfg`` this method cannot run with."""
        return iter(())

    # ---- built for one distiller --------------------------------------------------------------------------------
    def __init__(self, distiller: Distiller):
        self.distiller = distiller
        self.cfg = distiller.cfg
        alpha, beta, gamma = self.cfg.loss_weights()
        # The unweighted terms' weights; a term not named here (the detection loss) has weight 1.
        self.weights: dict[str, float] = {"kd/feat": alpha, "kd/cls": beta, "kd/ctr": beta, "kd/bbox": gamma}

    def modules(self) -> dict[str, nn.Module]:
        """The method's trained modules by name, registered on the distiller under these names (checkpoints)."""
        return {}

    def student_modules(self) -> list[nn.Module]:
        """The modules the student's optimizer steps beside the student (adapters)."""
        return []

    def assistant_param_groups(self) -> list[dict]:
        """Parameter groups of the method's own optimizer (an assistant); none by default."""
        return []

    def losses(self, student_out: Forward, teacher: tuple[Tensor, list[Tensor]] | None, opt: Optimizers, amp,
               phase: PhaseTimer) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the unweighted distillation terms of this iteration, extra logs). ``teacher``: its C5 and paired maps."""
        return {}, {}

    def assistant_step(self, student_out: Forward, teacher_maps: list[Tensor], opt: Optimizers, amp,
                       phase: PhaseTimer) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One step of the method's assistant alone (``assistant_iterations``): (its predictions, its logs)."""
        raise NotImplementedError(f"distill.method={self.name} has no assistant")
