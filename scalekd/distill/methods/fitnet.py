"""FitNet (Romero et al., 2015), a baseline: hints on the FPN maps through a 1x1 conv adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalekd.distill.methods.base import DistillMethod, register

if TYPE_CHECKING:
    from torch import nn


@register
class FitNet(DistillMethod):
    """kd/feat: the hint loss of ``scalekd.distill.fitnet_hint.FitNetHint``, its adapter stepped with the student."""

    name = "fitnet"

    def __init__(self, distiller):
        from scalekd.distill.fitnet_hint import FitNetHint

        super().__init__(distiller)
        self.hint = FitNetHint(self.cfg.model.fpn_channels)

    def modules(self) -> dict[str, nn.Module]:
        return {"fitnet": self.hint}

    def student_modules(self) -> list[nn.Module]:
        return [self.hint]

    def losses(self, student_out, teacher, opt, amp, phase):
        with amp, phase("fitnet"):
            return {"kd/feat": self.hint(student_out.fpn, teacher[1])}, {}
