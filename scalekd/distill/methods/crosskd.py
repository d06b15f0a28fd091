"""CrossKD (Wang et al., CVPR 2024), a baseline: the student's head features finished by the teacher's head,
distilled towards the teacher's own predictions (scalekd/distill/crosskd.py)."""

from __future__ import annotations

from scalekd.distill.methods.base import DistillMethod, register

CROSSKD_WEIGHTS = (1.0, 1.0)  # (kd/cls, kd/bbox): CrossKD's loss weights in its RetinaNet and FCOS configs


@register
class CrossKD(DistillMethod):
    name = "crosskd"
    teacher_input = "paired"

    @classmethod
    def default_weights(cls, paper):
        return (paper[0], *CROSSKD_WEIGHTS)

    @classmethod
    def problems(cls, cfg):
        if not cfg.one_stage:
            yield ("distill.method", cfg.distill.method, "crosskd on a one-stage detector (model.detector=retinanet "
                   "or fcos): it runs the teacher's dense head")

    def losses(self, student_out, teacher, opt, amp, phase):
        from scalekd.distill.crosskd import cross_head_losses

        d = self.distiller
        with amp, phase("crosskd"):
            return cross_head_losses(d.student_parts, d.teacher_parts, student_out, teacher[1],
                                     self.cfg.distill.crosskd, prefix="kd"), {}
