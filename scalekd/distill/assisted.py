"""The Cross-Scale Assistant run as a detector: student features + teacher features at 2x -> CSA -> head ->
the detector's own post-processing. Its AP, beside the student's, says whether the targets the student
is distilled towards are any better than its own predictions (the method's premise).

One-stage detectors only: a two-stage assistant's predictions exist only on the student's sampled
proposals, not as a detector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scalekd.distill.distiller import Distiller


def _student_setting(name: str) -> property:
    """An attribute read from and written to the distilled student."""
    return property(lambda self: getattr(self.distiller.student, name),
                    lambda self, value: setattr(self.distiller.student, name, value))


class AssistedDetector(nn.Module):
    """forward(images at the teacher's resolution) -> torchvision-style detections in those images' pixels.

    The student's transform resizes the same images down to the student's size, as in training, where
    both views come from one source image."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        if not distiller.student_parts.one_stage or distiller.csa is None:
            raise ValueError("only a one-stage detector distilled with the Cross-Scale Assistant can be run as "
                             "an assisted detector")
        self.distiller = distiller

    # The student's post-processing runs the detections, so eval settings go to it (see configure_for_eval).
    score_thresh = _student_setting("score_thresh")
    detections_per_img = _student_setting("detections_per_img")

    @torch.no_grad()
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        d = self.distiller
        student: nn.Module = d.student
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        image_list, _, _, fpn = d.student_parts.features(images)
        _, teacher_maps = d.teacher_parts.teacher_features(images)
        maps = d.assistant_maps(list(fpn.values()), teacher_maps)
        head_outputs = d.student_parts.predict(maps, list(fpn.keys()), None, d.assistant_head)
        anchors = student.anchor_generator(image_list, maps)
        # As torchvision's RetinaNet/FCOS forward: split per level, then their own post-processing.
        cells = [m.shape[2] * m.shape[3] for m in maps]
        per_cell = head_outputs["cls_logits"].shape[1] // sum(cells)
        split = [c * per_cell for c in cells]
        outputs = {k: list(v.split(split, dim=1)) for k, v in head_outputs.items()}
        detections = student.postprocess_detections(outputs, [list(a.split(split)) for a in anchors],
                                                    image_list.image_sizes)
        return student.transform.postprocess(detections, image_list.image_sizes, original_sizes)
