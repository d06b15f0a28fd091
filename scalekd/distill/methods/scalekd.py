"""ScaleKD (Zhu et al., CVPR 2023): SDF on C5, the Cross-Scale Assistant's predictions as the student's output
targets, and (``distill.cross_head_weight``, not in the paper) CrossKD's cross-head terms beside them.

One iteration: the assistant steps on the ground truth (only its parameters move), then the student steps on
L_det + alpha L_feat + beta L_cls + gamma L_bbox (+ the cross-head terms).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from scalekd.distill.methods.base import DistillMethod, register
from scalekd.distill.methods.crosskd import CROSSKD_WEIGHTS

if TYPE_CHECKING:
    from torch import Tensor, nn

    from scalekd.models.detectors import Detector


def c5_channels(model: Detector) -> int:
    import torch

    with torch.no_grad():
        body = model.backbone.body
        was_training = body.training
        body.eval()
        out = list(body(torch.zeros(1, 3, 64, 64)).values())[-1]
        body.train(was_training)
    return out.shape[1]


@register
class ScaleKD(DistillMethod):
    name = "scalekd"

    @classmethod
    def assistant_iterations(cls, cfg) -> int:
        return cfg.distill.csa.warmup_iterations if cfg.distill.csa.enabled else 0

    @classmethod
    def cross_head_possible(cls, cfg) -> bool:
        """The student's head features finished by the 2x teacher's P_{l+1} head are on the student's own grid and
        anchors only with scale-aligned pairing on a one-stage detector, and there must be a teacher to read (the
        no-teacher control's keys come from the student)."""
        k = cfg.distill
        return cfg.one_stage and k.pairing == "scale_aligned" and k.csa.keys_from == "teacher"

    @classmethod
    def problems(cls, cfg):
        c = cfg.distill.csa
        if c.enabled and not cfg.assistant_trains:
            if c.warmup_iterations:
                yield ("distill.csa.warmup_iterations", c.warmup_iterations, "0 when nothing in the assistant trains "
                       "(distill.csa.lr=0 and its head frozen): nothing to warm up")
            if c.teacher_anchor:
                yield ("distill.csa.teacher_anchor", c.teacher_anchor, "0 when nothing in the assistant trains "
                       "(distill.csa.lr=0 and its head frozen): the term steps nothing")

    def __init__(self, distiller):
        from scalekd.distill.csa import CrossScaleAssistant
        from scalekd.distill.sdf import ScaleDecoupledFeatures

        super().__init__(distiller)
        cfg, k = self.cfg, self.cfg.distill
        self.sdf = self.csa = self.assistant_head = None
        if k.sdf.enabled:
            self.sdf = ScaleDecoupledFeatures(c5_channels(distiller.student), c5_channels(distiller.teacher),
                                              k.sdf.embed_channels, k.sdf.dilations, k.sdf.weight_sharing,
                                              k.sdf.bottleneck_ratio, self.cfg.experimental.teacher_sdf)
        # Read once here, not on every assistant pass (config.Config.assistant_starts_as_teacher).
        self.starts_as_teacher = cfg.assistant_starts_as_teacher
        self.teacher_anchor = k.csa.teacher_anchor
        self.trains = cfg.assistant_trains
        if k.csa.enabled:
            self.csa = CrossScaleAssistant(cfg.model.fpn_channels, k.csa.heads, k.csa.rates, k.csa.attention,
                                           self.cfg.experimental.csa_positional, k.csa.locality, k.csa.zero_init_output)
            if k.csa.head == "own":
                # Interpretation ("we stacked head layers ... to update the weights"): the assistant gets its own
                # copy of the warm student's head (or, starting as the teacher, of the teacher's) and trains it with
                # the CSA, so it can use the teacher's features without waiting for the shared head to learn them.
                source = distiller.teacher_parts if self.starts_as_teacher else distiller.student_parts
                self.assistant_head = copy.deepcopy(source.prediction_head())
                self.assistant_head.requires_grad_(cfg.assistant_head_lr != 0)
            self.csa.requires_grad_(k.csa.lr != 0)
        self.weights.update({f"cross/{name}": cfg.cross_head_weight * w
                             for name, w in zip(("cls", "bbox"), CROSSKD_WEIGHTS)})

    def modules(self) -> dict[str, nn.Module]:
        named = {"sdf": self.sdf, "csa": self.csa, "assistant_head": self.assistant_head}
        return {name: module for name, module in named.items() if module is not None}

    def student_modules(self) -> list[nn.Module]:
        return [self.sdf] if self.sdf is not None else []

    def assistant_param_groups(self) -> list[dict]:
        """The CSA at ``csa.lr`` with its own head where that trains at the same rate (one group, the layout of
        checkpoints saved before ``csa.head_lr`` existed), else the head in a group of its own at ``csa.head_lr``;
        a part whose rate is 0 is frozen and left out (none: no optimizer)."""
        c = self.cfg.distill.csa
        if self.csa is None:
            return []
        head = list(self.assistant_head.parameters()) if self.assistant_head is not None else []
        if c.head_lr is None:
            return [{"params": list(self.csa.parameters()) + head}] if c.lr > 0 else []
        groups: list[dict] = [{"params": list(self.csa.parameters())}] if c.lr > 0 else []
        if head and c.head_lr > 0:
            groups.append({"params": head, "lr": c.head_lr})
        return groups

    def losses(self, student_out, teacher, opt, amp, phase):
        from scalekd.distill import losses as L
        from scalekd.distill.crosskd import cross_head_losses
        from scalekd.distill.output import output_losses

        teacher_c5, teacher_maps = teacher
        terms: dict[str, Tensor] = {}
        targets, logs = None, {}
        if self.csa is not None:
            targets, logs = self.assistant_step(student_out, teacher_maps, opt, amp, phase)
        with amp:
            if self.sdf is not None:
                with phase("sdf"):
                    s_emb, t_emb = self.sdf(student_out.c5, teacher_c5)
                    terms["kd/feat"] = L.feature_l2_loss(s_emb.float(), t_emb.float())
            with phase("losses"):
                if targets is not None:
                    terms.update(output_losses(self.distiller.student_parts, student_out.predictions,
                                               student_out.context, targets, self.cfg))
                if self.cfg.cross_head_weight:
                    d = self.distiller
                    terms.update(cross_head_losses(d.student_parts, d.teacher_parts, student_out, teacher_maps,
                                                   self.cfg.distill.crosskd, prefix="cross"))
        return terms, logs

    # ---- the Cross-Scale Assistant --------------------------------------------------------------------------------
    def assistant_maps(self, student_maps: list[Tensor], teacher_maps: list[Tensor]) -> list[Tensor]:
        """The CSA's output per FPN level; keys and values from the teacher's paired maps, or from the student
        itself on the same grids in the ``csa.keys_from=student`` control; added onto the student's maps, or onto
        the teacher's when the assistant starts as the teacher."""
        inputs = self.assistant_maps_inputs(student_maps, teacher_maps)
        return self.csa(student_maps, inputs, inputs if self.starts_as_teacher else None)

    def assistant_maps_inputs(self, student_maps: list[Tensor], teacher_maps: list[Tensor]) -> list[Tensor]:
        """The maps the assistant's keys and values come from (``distill.csa.keys_from``)."""
        from scalekd.geometry import resize_like

        if self.cfg.distill.csa.keys_from == "student":
            return [resize_like(s, t) for s, t in zip(student_maps, teacher_maps)]
        return teacher_maps

    def assistant_step(self, student_out, teacher_maps, opt, amp, phase):
        """CSA features -> the student's head (or its own copy) -> the detector's loss on ground truth -> Adam on
        the assistant's parameters only. A frozen assistant (``Config.assistant_trains``) skips the update and
        builds no graph; its loss is still logged."""
        import torch

        from scalekd.distill.distiller import check_finite

        parts, ctx = self.distiller.student_parts, student_out.context
        student_maps = [m.detach() for m in student_out.fpn]
        with amp, torch.set_grad_enabled(self.trains and torch.is_grad_enabled()):
            with phase("csa_attention"):
                assistant_maps = self.assistant_maps(student_maps, teacher_maps)
            with phase("assistant_head"):
                preds = parts.predict(assistant_maps, student_out.fpn_names, ctx, self.assistant_head)
                assistant_losses = parts.loss(preds, ctx)
            weights = {}
            if self.teacher_anchor:
                with phase("assistant_teacher_anchor"):
                    assistant_losses.update(self._teacher_anchor_losses(preds, student_out, teacher_maps))
                weights = {name: self.teacher_anchor * self.weights[name] for name in ("kd/cls", "kd/ctr", "kd/bbox")}
        check_finite({f"assistant/{k}": v for k, v in assistant_losses.items()})
        if self.trains:
            with phase("assistant_backward_step"):
                self._update(sum(weights.get(k, 1.0) * v.float() for k, v in assistant_losses.items()), opt)
        if self.cfg.experimental.csa_recompute:
            with phase("assistant_recompute"), torch.no_grad(), amp:
                preds = parts.predict(self.assistant_maps(student_maps, teacher_maps), student_out.fpn_names, ctx,
                                      self.assistant_head)
        logs = {f"assistant/{k}": v.detach() for k, v in assistant_losses.items()}
        return {k: v.detach() for k, v in preds.items()}, logs

    def _update(self, total: Tensor, opt) -> None:
        import torch

        params = [p for group in self.assistant_param_groups() for p in group["params"]]
        opt.assistant.zero_grad(set_to_none=True)
        # inputs= keeps gradients off the student's head, which a shared-head assistant must not step.
        total.backward(inputs=params)
        opt.sync(params)
        torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        opt.assistant.step()

    def _teacher_anchor_losses(self, preds: dict[str, Tensor], student_out, teacher_maps) -> dict[str, Tensor]:
        """``distill.csa.teacher_anchor`` (not in the paper): the assistant's predictions distilled towards the
        2x teacher's own on the student's anchors (OD's targets), with the student's output-distillation terms."""
        from scalekd.distill.output import output_losses

        targets = self.distiller.teacher_predictions(teacher_maps, student_out)
        return output_losses(self.distiller.student_parts, preds, student_out.context, targets, self.cfg)
