"""PKD (Cao et al., NeurIPS 2022; mmrazor's feature baseline): Pearson correlation of the FPN maps."""

from __future__ import annotations

from scalekd.distill.methods.base import DistillMethod, register

PKD_ALPHA = 10.0  # kd/feat weight: PKD's own loss weight for one-stage detectors (mmrazor's configs)


@register
class PKD(DistillMethod):
    """kd/feat: the MSE of the per-channel standardised student and teacher maps (the teacher's resized to the
    student's grid where the pairing leaves it finer)."""

    name = "pkd"

    @classmethod
    def default_weights(cls, paper):
        return (PKD_ALPHA, *paper[1:])

    def losses(self, student_out, teacher, opt, amp, phase):
        from scalekd.distill import losses as L
        from scalekd.geometry import resize_like

        with amp, phase("pkd"):
            paired = [resize_like(t, s) for s, t in zip(student_out.fpn, teacher[1])]
            return {"kd/feat": L.pkd_loss([s.float() for s in student_out.fpn], [t.float() for t in paired])}, {}
