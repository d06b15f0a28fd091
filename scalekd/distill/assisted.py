"""The Cross-Scale Assistant run as a detector: student features + teacher features at 2x -> CSA -> head ->
the detector's own post-processing. Its AP, beside the student's, says whether the targets the student
is distilled towards are any better than its own predictions (the method's premise).

One-stage detectors only: a two-stage assistant's predictions exist only on the student's sampled
proposals, not as a detector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scalekd.distill.csa import squared_cell_distance
from scalekd.distill.distiller import Distiller
from scalekd.models.detectors import Detector
from scalekd.distill.methods.scalekd import ScaleKD

TEACHER_ABLATIONS = ("intact", "permuted", "other_image", "zeroed")


def ablate_maps(maps: list[Tensor], how: str, seed: int = 0) -> list[Tensor]:
    """Diagnostics of what the assistant reads (the teacher's maps or the student's): the maps as they are, their
    cells shuffled within each image (the same permutation for every channel), the next image's maps in the batch,
    or zeros."""
    if how == "intact":
        return maps
    if how == "zeroed":
        return [torch.zeros_like(m) for m in maps]
    if how == "other_image":
        return [m.roll(1, dims=0) for m in maps]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for m in maps:
        order = torch.randperm(m.shape[-2] * m.shape[-1], generator=generator).to(m.device)
        out.append(m.flatten(2)[..., order].view_as(m))
    return out


@torch.no_grad()
def footprint_attention(distiller: Distiller, student_images: list[Tensor], teacher_images: list[Tensor],
                        level: int = 0) -> list[float]:
    """Per head group at one FPN level: the mean attention a query puts on the key cell nearest its own
    centre, divided by the uniform share 1/L (1: no localisation; L: all on its own cell)."""
    parts = distiller.student_parts
    _, _, _, fpn = parts.features(student_images)
    _, teacher_maps = distiller.teacher_maps(teacher_images)
    student_map = list(fpn.values())[level]
    method = assistant_method(distiller)
    teacher_map = method.assistant_maps_inputs(list(fpn.values()), teacher_maps)[level]
    h, w = student_map.shape[-2:]
    ratios = []
    for weights, (gh, gw) in method.csa.attention.attention_weights(student_map, teacher_map):
        nearest = squared_cell_distance(h, w, gh, gw, weights.device).argmin(dim=1)  # [hw]
        own = weights.gather(-1, nearest.view(1, 1, -1, 1).expand(*weights.shape[:2], -1, 1))
        ratios.append(float(own.mean()) * weights.shape[-1])
    return ratios


def assistant_method(distiller: Distiller) -> ScaleKD:
    """The distiller's method, which must have a Cross-Scale Assistant."""
    method = distiller.method
    if not isinstance(method, ScaleKD) or method.csa is None:
        raise ValueError(f"distill.method={distiller.cfg.distill.method} has no Cross-Scale Assistant to run")
    return method


def _student_setting(name: str) -> property:
    """An attribute read from and written to the distilled student."""
    return property(lambda self: getattr(self.distiller.student, name),
                    lambda self, value: setattr(self.distiller.student, name, value))


class AssistedDetector(nn.Module):
    """forward(student views, teacher views) -> torchvision-style detections in the student views' pixels.

    Both views are made as in training (``DualResolutionCollate``: each resized from the source image with
    antialiasing, the teacher's exactly ``teacher_scale`` x the student's), so the assistant is compared with
    its student on the very inputs the student is evaluated on."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        if not distiller.student_parts.one_stage or getattr(distiller.method, "csa", None) is None:
            raise ValueError("only a one-stage detector distilled with the Cross-Scale Assistant can be run as "
                             "an assisted detector")
        self.distiller = distiller
        self.teacher_scale = distiller.cfg.data.teacher_scale
        self.teacher_ablation = "intact"  # a diagnostic (TEACHER_ABLATIONS); the detector itself is "intact"
        # The same on the student's maps, the queries (an assistant started as the teacher that ignores its
        # student's queries is the teacher fine-tuned, nothing cross-scale).
        self.student_ablation = "intact"

    # The student's post-processing runs the detections, so eval settings go to it (see configure_for_eval).
    score_thresh = _student_setting("score_thresh")
    detections_per_img = _student_setting("detections_per_img")

    @torch.no_grad()
    def forward(self, student_images: list[Tensor], teacher_images: list[Tensor]) -> list[dict[str, Tensor]]:
        d = self.distiller
        method = assistant_method(d)
        student: Detector = d.student
        original_sizes = [tuple(im.shape[-2:]) for im in student_images]
        image_list, _, _, fpn = d.student_parts.features(student_images)
        _, teacher_maps = d.teacher_maps(teacher_images)
        student_maps = ablate_maps(list(fpn.values()), self.student_ablation)
        maps = method.assistant_maps(student_maps, ablate_maps(teacher_maps, self.teacher_ablation))
        head_outputs = d.student_parts.predict(maps, list(fpn.keys()), None, method.assistant_head)
        anchors = student.anchor_generator(image_list, maps)
        # As torchvision's RetinaNet/FCOS forward: split per level, then their own post-processing.
        cells = [m.shape[2] * m.shape[3] for m in maps]
        per_cell = head_outputs["cls_logits"].shape[1] // sum(cells)
        split = [c * per_cell for c in cells]
        outputs = {k: list(v.split(split, dim=1)) for k, v in head_outputs.items()}
        detections = student.postprocess_detections(outputs, [list(a.split(split)) for a in anchors],
                                                    image_list.image_sizes)
        return student.transform.postprocess(detections, image_list.image_sizes, original_sizes)
