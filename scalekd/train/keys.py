"""A stage's reuse key: sha256 over what determines its result (the stage, the part of its config it reads, its
training annotations and the bytes of the models it starts from). A finished stage is reused only for the same key,
so a setting added later must leave the keys of stages finished before it unchanged: the key is computed over the
config written for its first version (``scalekd.config_versions.downgrade``). Where the data live is not an input
either: one dataset spelled two ways (relative and absolute, from another checkout) shares its keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from scalekd import storage
from scalekd.data.annotations import split_annotations
from scalekd.config import Config, config_from_dict
from scalekd.config_versions import downgrade

if TYPE_CHECKING:
    from scalekd.train.stage import StageRequest


# Config fields that say where or how robustly a stage runs, not what it computes: a rerun that changes only these
# reuses the finished stage.
_NOT_INPUTS = {"scaling": ("ray_address", "max_failures"), "train": ("log_interval", "checkpoint_interval")}
# Nor is the data's location: their training annotations are hashed by content instead.
_LOCATION = ("root", "cache_dir")
# Config a stage never reads: the teacher and the warm-up train no distillation modules, and each stage runs its own
# iteration count. A new distillation setting (or a new field with its default) must not retire a finished teacher.
_OTHER_STAGES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "teacher": {"distill": None, "train": ("warmup_iterations", "distill_iterations", "freeze_backbone_iterations")},
    "warmup": {"distill": None, "train": ("teacher_iterations", "distill_iterations")},
    "distill": {"train": ("teacher_iterations", "warmup_iterations", "freeze_backbone_iterations")},
}


def stage_inputs_config(stage: str, config: dict, location: bool = False) -> dict:
    """The part of a stage's config that determines its result (``inputs_key``); ``location`` keeps the data's
    location in it, as keys written before it left them did."""
    other = {**_OTHER_STAGES.get(stage, {})}
    if not location:
        other["data"] = (*(other.get("data") or ()), *_LOCATION)
    out = {}
    for section, values in downgrade(config).items():
        if section in other and other[section] is None:
            continue
        if isinstance(values, dict):
            dropped = _NOT_INPUTS.get(section, ()) + (other.get(section) or ())
            values = {k: v for k, v in values.items() if k not in dropped}
        out[section] = values
    return out


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
    return _key(request, stored_location=None)


def same_inputs(request: StageRequest, key: str, stored_key: object, stored_config: Callable[[], object]) -> bool:
    """Whether a finished stage or checkpoint keyed ``stored_key`` came from this request's inputs. Keys written
    before the data's location left the key hashed ``data.root`` as it was spelled; such a key still matches when
    the stage differs from the request in that spelling alone (the root it read is in the config it stored, which
    ``stored_config`` reads only then)."""
    if stored_key == key:
        return True
    config = stored_config()
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return False
    return stored_key == _key(request, stored_location={k: data[k] for k in _LOCATION if k in data})


def _key(request: StageRequest, stored_location: dict | None) -> str:
    cfg = config_from_dict(request.config)
    config = _with_cross_head_weight_resolved(request.config, cfg)
    if stored_location is not None:  # the earlier keys' form, with the location the stage read
        config = {**config, "data": {**config["data"], **stored_location}}
    config = stage_inputs_config(request.stage, config, location=stored_location is not None)
    h = hashlib.sha256(json.dumps({"stage": request.stage, "config": config}, sort_keys=True).encode())
    h.update(storage.read_bytes(split_annotations(request.data, cfg.data.train_split)))
    for model in (request.teacher, request.student_init):
        h.update(storage.read_bytes(model) if model else b"-")
    return h.hexdigest()
