"""A stage's reuse key: sha256 over what determines its result (the stage, the part of its config it reads, its
training annotations and the bytes of the models it starts from). A finished stage is reused only for the same key,
so a setting added later must leave the keys of stages finished before it unchanged (``_LEFT_OUT_WHEN``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from scalekd import storage
from scalekd.config import Config, config_from_dict

if TYPE_CHECKING:
    from scalekd.train.loop import StageRequest


# Config fields that say where or how robustly a stage runs, not what it computes: a rerun that changes only these
# reuses the finished stage.
_NOT_INPUTS = {"scaling": ("ray_address", "max_failures"), "train": ("log_interval", "checkpoint_interval")}
# Config a stage never reads: the teacher and the warm-up train no distillation modules, and each stage runs its own
# iteration count. A new distillation setting (or a new field with its default) must not retire a finished teacher.
_OTHER_STAGES = {
    "teacher": {"distill": None, "train": ("warmup_iterations", "distill_iterations", "freeze_backbone_iterations")},
    "warmup": {"distill": None, "train": ("teacher_iterations", "distill_iterations")},
    "distill": {"train": ("teacher_iterations", "warmup_iterations", "freeze_backbone_iterations")},
}


# Settings (paths into the config) left out of a stage's key when they cannot change its result, so that adding one
# (with its default) does not retire the stages a user finished before it existed: ATSS's k is read only by ATSS;
# the box loss at "l1", the assistant's head at the CSA's rate and no teacher anchor are what every stage ran before
# the fields existed; CrossKD's settings are read by CrossKD alone, or by ScaleKD with cross-head terms beside it.
_LEFT_OUT_WHEN: dict[tuple[str, ...], Callable[[dict], bool]] = {
    ("model", "atss_topk"): lambda config: _setting(config, "model", "assigner") != "atss",
    ("model", "box_loss"): lambda config: _setting(config, "model", "box_loss") in (None, "l1"),
    ("distill", "csa", "head_lr"): lambda config: _setting(config, "distill", "csa", "head_lr") is None,
    ("distill", "csa", "teacher_anchor"): lambda config: not _setting(config, "distill", "csa", "teacher_anchor"),
    ("distill", "crosskd"): lambda config: (_setting(config, "distill", "method") != "crosskd"
                                            and not _setting(config, "distill", "cross_head_weight")),
    ("distill", "cross_head_weight"): lambda config: not _setting(config, "distill", "cross_head_weight"),
    ("data", "teacher_holdout"): lambda config: not _setting(config, "data", "teacher_holdout"),
    ("distill", "kd_ramp_iterations"): lambda config: not _setting(config, "distill", "kd_ramp_iterations"),
}


def _setting(config: dict, *path: str):
    """The value at ``path`` in a config dict, None where any part of it is absent."""
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def stage_inputs_config(stage: str, config: dict) -> dict:
    """The part of a stage's config that determines its result (``inputs_key``)."""
    other = _OTHER_STAGES.get(stage, {})
    out = {}
    for section, values in config.items():
        if section in other and other[section] is None:
            continue
        if isinstance(values, dict):
            dropped = _NOT_INPUTS.get(section, ()) + other.get(section, ())
            values = {k: v for k, v in values.items() if k not in dropped}
        out[section] = values
    for path, left_out in _LEFT_OUT_WHEN.items():
        if left_out(config):
            out = _without(out, path)
    return out


def _without(config: dict, path: tuple[str, ...]) -> dict:
    """A copy of ``config`` without the setting at ``path`` (unchanged where it is absent)."""
    head, *rest = path
    if head not in config:
        return config
    if not rest:
        return {k: v for k, v in config.items() if k != head}
    inner = config[head]
    return {**config, head: _without(inner, tuple(rest)) if isinstance(inner, dict) else inner}


def _with_cross_head_weight_resolved(config: dict, cfg: Config) -> dict:
    """The config with ``distill.cross_head_weight`` set to the weight the stage runs at (``auto`` resolved, and a
    dict written without the field given the default's weight), so that a stage run at ``auto`` and one run at that
    number share a key, and one run at 0 keys as the stages finished before the field existed."""
    distill = config.get("distill")
    if not isinstance(distill, dict):
        return config
    return {**config, "distill": {**distill, "cross_head_weight": cfg.cross_head_weight}}


def inputs_key(request: StageRequest) -> str:
    """sha256 over what determines a stage's result: the stage, its config, its training annotations and the
    bytes of the models it starts from. A finished stage is reused only for the same key."""
    cfg = config_from_dict(request.config)
    config = stage_inputs_config(request.stage, _with_cross_head_weight_resolved(request.config, cfg))
    h = hashlib.sha256(json.dumps({"stage": request.stage, "config": config}, sort_keys=True).encode())
    h.update(storage.read_bytes(storage.join(request.data, "annotations", f"instances_{cfg.data.train_split}.json")))
    for model in (request.teacher, request.student_init):
        h.update(storage.read_bytes(model) if model else b"-")
    return h.hexdigest()
