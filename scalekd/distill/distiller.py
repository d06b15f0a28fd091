"""One ScaleKD training iteration: teacher forward at 2x -> student forward -> assistant step on
ground truth (only CSA parameters move) -> student step on L_det + alpha L_feat + beta L_cls + gamma L_bbox.

The same class runs the baselines (plain student, FitNet, Chen et al. "OD", PKD, CrossKD) and every ablation, so
they share one loop and one set of logs; ``distill.cross_head_weight`` (not in the paper; on by default,
``auto``) adds CrossKD's cross-head terms to ScaleKD's. Nothing here knows about Ray: gradient averaging across
workers comes in as a callable.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scalekd.config import CROSSKD_WEIGHTS, Config
from scalekd.data.transforms import DualBatch
from scalekd.distill import losses as L
from scalekd.distill.baselines import FitNetHint
from scalekd.distill.crosskd import cross_head_predictions
from scalekd.distill.csa import CrossScaleAssistant
from scalekd.distill.pairing import pair_teacher_maps, resize_like
from scalekd.distill.sdf import ScaleDecoupledFeatures
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


def c5_channels(model: nn.Module) -> int:
    with torch.no_grad():
        body = model.backbone.body
        was_training = body.training
        body.eval()
        out = list(body(torch.zeros(1, 3, 64, 64)).values())[-1]
        body.train(was_training)
    return out.shape[1]


def student_update(total: Tensor, params: list[nn.Parameter], opt: Optimizers) -> None:
    """Backward, average gradients across workers, clip, step: the student optimizer's update."""
    opt.student.zero_grad(set_to_none=True)
    total.backward()
    params = [p for p in params if p.requires_grad]
    opt.sync(params)
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], opt.grad_clip)
    opt.student.step()


class Distiller(nn.Module):
    """Holds the student, the frozen teacher and the distillation modules of one method."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Config):
        super().__init__()
        k = cfg.distill
        self.cfg = cfg
        self.method = k.method
        self.alpha, self.beta, self.gamma = cfg.loss_weights()
        # The output-distillation terms' weights, for the student and (times teacher_anchor) the anchored assistant.
        self.output_weights = {"kd/cls": self.beta, "kd/ctr": self.beta, "kd/bbox": self.gamma}
        # ScaleKD with CrossKD's cross-head terms beside it (distill.cross_head_weight, not in the paper).
        self.cross_head_weights = {f"cross/{name}": cfg.cross_head_weight * w
                                   for name, w in zip(("cls", "bbox"), CROSSKD_WEIGHTS)}
        self.student = student
        self.student_parts = DetectorParts(student, cfg.model.assigner, cfg.model.atss_topk)
        # The teacher is frozen and kept out of this module's state_dict and parameters().
        self._teacher = [teacher] if teacher is not None else []
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self.teacher_parts = DetectorParts(teacher, cfg.model.assigner, cfg.model.atss_topk)
        if self.method != "none" and teacher is None:
            raise ValueError(f"distill.method={self.method} needs a teacher")
        self.sdf = None
        self.csa = None
        self.fitnet = None
        if self.method == "scalekd" and k.sdf.enabled:
            self.sdf = ScaleDecoupledFeatures(c5_channels(student), c5_channels(teacher), k.sdf.embed_channels,
                                              k.sdf.dilations, k.sdf.weight_sharing, k.sdf.bottleneck_ratio,
                                              k.sdf.teacher_sdf)
        self.assistant_head = None
        # Read once here, not on every assistant pass (config.Config.assistant_starts_as_teacher).
        self.starts_as_teacher = cfg.assistant_starts_as_teacher
        self.teacher_anchor = cfg.distill.csa.teacher_anchor
        self.assistant_trains = cfg.assistant_trains
        if self.method == "scalekd" and k.csa.enabled:
            self.csa = CrossScaleAssistant(cfg.model.fpn_channels, k.csa.heads, k.csa.rates, k.csa.attention,
                                           k.csa.positional, k.csa.locality, k.csa.zero_init_output)
            if k.csa.head == "own":
                # Interpretation ("we stacked head layers ... to update the weights"): the assistant gets
                # its own copy of the warm student's head (or, starting as the teacher, of the teacher's) and
                # trains it with the CSA, so it can use the teacher's features without waiting for the shared
                # head to learn to read them.
                source = self.teacher_parts if self.starts_as_teacher else self.student_parts
                self.assistant_head = copy.deepcopy(source.prediction_head())
                self.assistant_head.requires_grad_(cfg.assistant_head_lr != 0)
            self.csa.requires_grad_(k.csa.lr != 0)
        if self.method == "fitnet":
            self.fitnet = FitNetHint(cfg.model.fpn_channels)

    def load_distillation_state(self, state: dict[str, Tensor]) -> None:
        """Load what a checkpoint holds besides the student (SDF, CSA, the assistant's head); raises
        ValueError when it was saved under another distillation config."""
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
        """What the student optimizer steps: the student plus SDF / FitNet adapters."""
        params = [p for p in self.student.parameters()]
        for module in (self.sdf, self.fitnet):
            if module is not None:
                params += [p for p in module.parameters() if p.requires_grad]
        return params

    def assistant_parameters(self) -> list[nn.Parameter]:
        """What the assistant optimizer steps: the CSA, and its own head where it has one that trains."""
        return [p for group in self.assistant_param_groups() for p in group["params"]]

    def assistant_param_groups(self) -> list[dict]:
        """The assistant optimizer's groups: the CSA at ``csa.lr`` with its own head where that trains at the same
        rate (one group, the layout of checkpoints saved before ``csa.head_lr`` existed), else the head in a
        group of its own at ``csa.head_lr``; a part whose rate is 0 is frozen and left out (none: no optimizer)."""
        c = self.cfg.distill.csa
        if self.csa is None:
            return []
        head = list(self.assistant_head.parameters()) if self.assistant_head is not None else []
        if c.head_lr is None:
            return [{"params": list(self.csa.parameters()) + head}] if c.lr > 0 else []
        groups = [{"params": list(self.csa.parameters())}] if c.lr > 0 else []
        if head and c.head_lr > 0:
            groups.append({"params": head, "lr": c.head_lr})
        return groups

    # ------------------------------------------------------------------------------------------------
    def train_step(self, batch: DualBatch, opt: Optimizers, autocast: torch.dtype | None = None,
                   phase: PhaseTimer | None = None, kd_scale: float = 1.0) -> dict[str, Tensor]:
        """One iteration; returns the named, unweighted loss terms (detached) for logging.

        ``phase(name)`` (a context manager, see benchmarks/cost.py) times the parts of the iteration; ``kd_scale``
        multiplies alpha, beta and gamma (``distill.kd_ramp_iterations``), never the detection loss.
        """
        phase = phase or _no_phase
        amp = autocast_context(autocast)
        logs: dict[str, Tensor] = {}
        with phase("teacher"), amp:
            teacher_c5, teacher_maps = self._teacher_features(batch)
        with phase("student_forward"), amp:
            student_out = self.student_parts.forward_train(batch.student_images, batch.student_targets)
        terms = {f"det/{k}": v for k, v in student_out.losses.items()}
        target_preds = None
        if self.csa is not None:
            target_preds, assistant_logs = self._assistant_step(student_out, teacher_maps, opt, amp, phase)
            logs.update(assistant_logs)
        elif self.method == "od":
            # Same-level OD runs the teacher at the student's size (Chen et al.); scale-aligned OD reads the 2x
            # teacher's P_{l+1} outputs, which are predictions on the student's own anchors.
            with amp:
                target_preds = self.teacher_predictions(teacher_maps, student_out)
        with amp:
            with phase("sdf"):
                if self.sdf is not None:
                    s_emb, t_emb = self.sdf(student_out.c5, teacher_c5)
                    terms["kd/feat"] = L.feature_l2_loss(s_emb.float(), t_emb.float())
                if self.fitnet is not None:
                    terms["kd/feat"] = self.fitnet(student_out.fpn, teacher_maps)
                if self.method == "pkd":
                    paired = [resize_like(t, s) for s, t in zip(student_out.fpn, teacher_maps)]
                    terms["kd/feat"] = L.pkd_loss([s.float() for s in student_out.fpn], [t.float() for t in paired])
            with phase("losses"):
                if target_preds is not None:
                    terms.update(self._output_losses(student_out.predictions, student_out.context, target_preds))
                if self.method == "crosskd":
                    terms.update(self._crosskd_losses(student_out, teacher_maps))
                elif self.cfg.cross_head_weight:
                    cross = self._crosskd_losses(student_out, teacher_maps)
                    terms.update({name.replace("kd/", "cross/"): value for name, value in cross.items()})
        weights = {name: kd_scale * w for name, w in
                   {"kd/feat": self.alpha, **self.output_weights, **self.cross_head_weights}.items()}
        check_finite(terms)
        with phase("student_backward_step"):
            total = sum(weights.get(name, 1.0) * value.float() for name, value in terms.items())
            student_update(total, self.student_parameters(), opt)
        logs.update({k: v.detach() for k, v in terms.items()})
        logs["loss/total"] = total.detach()
        return logs

    def assistant_warmup_step(self, batch: DualBatch, opt: Optimizers,
                              autocast: torch.dtype | None = None) -> dict[str, Tensor]:
        """The assistant's step alone; the student's weights do not move (``distill.csa.warmup_iterations``)."""
        amp = autocast_context(autocast)
        with torch.no_grad(), amp, frozen_batchnorm_statistics(self.student):
            _, teacher_maps = self._teacher_features(batch)
            student_out = self.student_parts.forward_train(batch.student_images, batch.student_targets)
        _, logs = self._assistant_step(student_out, teacher_maps, opt, amp, _no_phase)
        logs["loss/total"] = sum(logs.values())
        return logs

    def assistant_maps(self, student_maps: list[Tensor], teacher_maps: list[Tensor]) -> list[Tensor]:
        """The CSA's output per FPN level; keys and values from the teacher's paired maps, or from the student
        itself on the same grids in the ``csa.keys_from=student`` control; added onto the student's maps, or onto
        the teacher's when the assistant starts as the teacher."""
        inputs = self.assistant_maps_inputs(student_maps, teacher_maps)
        return self.csa(student_maps, inputs, inputs if self.starts_as_teacher else None)

    def assistant_maps_inputs(self, student_maps: list[Tensor], teacher_maps: list[Tensor]) -> list[Tensor]:
        """The maps the assistant's keys and values come from (``distill.csa.keys_from``)."""
        if self.cfg.distill.csa.keys_from == "student":
            return [resize_like(s, t) for s, t in zip(student_maps, teacher_maps)]
        return teacher_maps

    def teacher_maps(self, images_2x: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The frozen teacher's C5 and its FPN maps paired with the student's levels (``distill.pairing``)."""
        with torch.no_grad():
            c5, maps = self.teacher_parts.teacher_features(images_2x)
        return c5, self._pair(maps)

    def _pair(self, maps: list[Tensor]) -> list[Tensor]:
        # Every detector we build has five FPN levels (P3-P7, P2-P6, or P2-P5 and the pooled P6).
        return pair_teacher_maps(maps, 5, self.student_parts.min_level, self.teacher_parts.min_level,
                                 self.cfg.distill.pairing)

    def _teacher_features(self, batch: DualBatch):
        if self.method == "none":
            return None, None
        if self.method in ("od", "crosskd") and self.cfg.distill.pairing == "same_level":
            # Chen et al.'s "OD" compares outputs anchor by anchor: the teacher sees the student's size.
            with torch.no_grad():
                return self.teacher_parts.teacher_features(batch.student_images, keep_size=True)
        return self.teacher_maps(batch.teacher_images)

    def _assistant_step(self, student_out: Forward, teacher_maps: list[Tensor], opt: Optimizers, amp,
                        phase: PhaseTimer):
        """CSA features -> the student's head (or its own copy) -> the detector's loss on ground truth -> Adam on
        the assistant's parameters only. A frozen assistant (``Config.assistant_trains``) skips the update and
        builds no graph; its loss is still logged."""
        parts, ctx = self.student_parts, student_out.context
        student_maps = [m.detach() for m in student_out.fpn]
        with amp, torch.set_grad_enabled(self.assistant_trains and torch.is_grad_enabled()):
            with phase("csa_attention"):
                assistant_maps = self.assistant_maps(student_maps, teacher_maps)
            with phase("assistant_head"):
                preds = parts.predict(assistant_maps, student_out.fpn_names, ctx, self.assistant_head)
                assistant_losses = parts.loss(preds, ctx)
            weights = {}
            if self.teacher_anchor:
                with phase("assistant_teacher_anchor"):
                    assistant_losses.update(self._teacher_anchor_losses(preds, student_out, teacher_maps))
                weights = {name: self.teacher_anchor * w for name, w in self.output_weights.items()}
        check_finite({f"assistant/{k}": v for k, v in assistant_losses.items()})
        if self.assistant_trains:
            with phase("assistant_backward_step"):
                assistant_total = sum(weights.get(k, 1.0) * v.float() for k, v in assistant_losses.items())
                csa_params = self.assistant_parameters()
                opt.assistant.zero_grad(set_to_none=True)
                # inputs= keeps gradients off the student's head, which a shared-head assistant must not step.
                assistant_total.backward(inputs=csa_params)
                opt.sync(csa_params)
                torch.nn.utils.clip_grad_norm_(csa_params, opt.grad_clip)
                opt.assistant.step()
        if self.cfg.distill.csa.recompute:
            with phase("assistant_recompute"), torch.no_grad(), amp:
                preds = parts.predict(self.assistant_maps(student_maps, teacher_maps), student_out.fpn_names, ctx,
                                      self.assistant_head)
        logs = {f"assistant/{k}": v.detach() for k, v in assistant_losses.items()}
        return {k: v.detach() for k, v in preds.items()}, logs

    def _teacher_anchor_losses(self, preds: dict[str, Tensor], student_out: Forward,
                               teacher_maps: list[Tensor]) -> dict[str, Tensor]:
        """``distill.csa.teacher_anchor`` (not in the paper): the assistant's predictions distilled towards the
        2x teacher's own on the student's anchors (OD's targets), with the student's output-distillation terms."""
        return self._output_losses(preds, student_out.context, self.teacher_predictions(teacher_maps, student_out))

    @torch.no_grad()
    def teacher_predictions(self, teacher_maps: list[Tensor], student_out: Forward) -> dict[str, Tensor]:
        """OD's targets: the teacher's head on its paired maps, read on the student's anchors or proposals (with
        scale-aligned pairing, the 2x teacher's P_{l+1} predictions, which are on the student's own anchors)."""
        return self.teacher_parts.predict(teacher_maps, student_out.fpn_names, student_out.context)

    def _crosskd_losses(self, student_out: Forward, teacher_maps: list[Tensor]) -> dict[str, Tensor]:
        """CrossKD's terms (scalekd/distill/crosskd.py) on the student's anchors, every one not ignored: kd/cls, its
        quality focal loss, and kd/bbox, the GIoU of the decoded boxes weighted by the teacher's top class score;
        each per foreground anchor. The student's own outputs learn from the ground truth alone."""
        k = self.cfg.distill.crosskd
        heads = self.student_parts.prediction_head(), self.teacher_parts.prediction_head()
        cross, target = cross_head_predictions(*heads, student_out.fpn, teacher_maps, k.head_index)
        ctx = student_out.context
        matched = torch.stack(ctx.matched_idxs)
        valid = (matched >= -1).float()  # -2: between the IoU thresholds, ignored by the detector's own loss
        foreground = (matched >= 0).sum().float()
        target_logits = target["cls_logits"].float()
        cls = L.quality_focal_kd_loss(cross["cls_logits"].float(), target_logits, valid, foreground, k.focal_beta)
        box_weight = target_logits.sigmoid().amax(dim=-1) * valid
        boxes = [self.student_parts.decode_boxes(p["bbox_regression"].float(), ctx.anchors) for p in (cross, target)]
        box = L.weighted_giou_loss(boxes[0].reshape(-1, 4), boxes[1].reshape(-1, 4), box_weight.reshape(-1), foreground)
        return {"kd/cls": cls, "kd/bbox": box}

    def _output_losses(self, pred: dict[str, Tensor], ctx, target: dict[str, Tensor]) -> dict[str, Tensor]:
        """The output distillation of ``pred`` (the student's, or the assistant's when anchored) towards
        ``target`` on the student's anchors or proposals (``ctx``): unweighted kd/cls (kd/ctr) and kd/bbox."""
        k = self.cfg.distill
        parts = self.student_parts
        if parts.one_stage:
            fg, gt_reg = parts.dense_regression_targets(ctx)
            cls = L.soft_sigmoid_loss(pred["cls_logits"].float(), target["cls_logits"].float(), k.temperature,
                                      k.background_weight, normalizer=fg.sum())
            s_reg, t_reg, y = pred["bbox_regression"][fg].float(), target["bbox_regression"][fg].float(), gt_reg[fg]
            out = {"kd/cls": cls}
            if parts.kind == "fcos":
                out["kd/ctr"] = L.centerness_loss(pred["bbox_ctrness"][fg].squeeze(-1).float(),
                                                  target["bbox_ctrness"][fg].squeeze(-1).float())
        else:
            labels = torch.cat(ctx.roi_labels)
            y = torch.cat(ctx.roi_regression_targets)
            out = {"kd/cls": L.soft_softmax_loss(pred["class_logits"].float(), target["class_logits"].float(),
                                                 k.temperature, k.background_weight)}
            pos = torch.where(labels > 0)[0]
            cols = labels[pos]
            s_reg = pred["box_regression"].float().reshape(labels.shape[0], -1, 4)[pos, cols]
            t_reg = target["box_regression"].float().reshape(labels.shape[0], -1, 4)[pos, cols]
            y = y[pos]
        if k.bbox_loss == "bounded":
            out["kd/bbox"] = L.bounded_regression_loss(s_reg, t_reg, y, k.margin)
        else:
            out["kd/bbox"] = L.mimic_regression_loss(s_reg, t_reg, k.bbox_loss)
        return out
