"""The plain student: the warm student trained on with the detection loss alone, no teacher (the baseline)."""

from __future__ import annotations

from scalekd.distill.methods.base import DistillMethod, register


@register
class Plain(DistillMethod):
    name = "none"
    teacher_input = "none"
