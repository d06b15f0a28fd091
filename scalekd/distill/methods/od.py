"""Output distillation (Chen et al., NeurIPS 2017, "OD"), a baseline: the student's outputs towards the teacher's.

With scale-aligned pairing the targets are the 2x teacher's P_{l+1} predictions, which are on the student's own
anchors; with same-level pairing the teacher sees the student's size and is compared anchor by anchor.
"""

from __future__ import annotations

from scalekd.distill.methods.base import DistillMethod, register


@register
class OutputDistillation(DistillMethod):
    name = "od"
    teacher_input = "paired"

    def losses(self, student_out, teacher, opt, amp, phase):
        from scalekd.distill.output import output_losses

        with amp:
            targets = self.distiller.teacher_predictions(teacher[1], student_out)
        with amp, phase("od"):
            return output_losses(self.distiller.student_parts, student_out.predictions, student_out.context,
                                 targets, self.cfg), {}
