"""The config's versions: which setting each version added, and how a config is written for an earlier version
(detectron2's config ``VERSION`` with its upgrade/downgrade functions, for the settings we add).

Every setting a version added has a default that computes what earlier versions computed without it. A config is
*downgraded* by dropping each later setting where it holds such a value, so the oldest form that expresses a run is
the one a stage's reuse key is computed over (``scalekd.train.keys``): adding a setting means one entry here and a
version bump, and leaves the key of every stage finished before it as it was. Upgrading an older config is filling
the new settings' defaults, which loading a config does (``scalekd.config.config_from_dict``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def setting(config: dict, *path: str) -> Any:
    """The value at ``path`` in a config dict, None where any part of it is absent."""
    value: Any = config
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def without(config: dict, path: tuple[str, ...]) -> dict:
    """A copy of ``config`` without the setting at ``path`` (unchanged where it is absent)."""
    head, *rest = path
    if head not in config:
        return config
    if not rest:
        return {k: v for k, v in config.items() if k != head}
    inner = config[head]
    return {**config, head: without(inner, tuple(rest)) if isinstance(inner, dict) else inner}


@dataclass(frozen=True)
class Addition:
    """A setting (``path``) that config ``version`` added; ``as_before(config)`` is True where the config computes
    what the versions before it computed without the setting, so it can be written without it."""

    version: int
    path: tuple[str, ...]
    as_before: Callable[[dict], bool]


def _crosskd_unread(config: dict) -> bool:
    """CrossKD's settings are read by CrossKD alone, or by ScaleKD with cross-head terms beside it."""
    return setting(config, "distill", "method") != "crosskd" and not setting(config, "distill", "cross_head_weight")


HISTORY: tuple[Addition, ...] = (
    Addition(2, ("model", "box_loss"), lambda config: setting(config, "model", "box_loss") in (None, "l1")),
    Addition(3, ("model", "atss_topk"), lambda config: setting(config, "model", "assigner") != "atss"),
    Addition(4, ("distill", "csa", "head_lr"), lambda config: setting(config, "distill", "csa", "head_lr") is None),
    Addition(5, ("distill", "csa", "teacher_anchor"),
             lambda config: not setting(config, "distill", "csa", "teacher_anchor")),
    Addition(6, ("distill", "crosskd"), _crosskd_unread),
    Addition(7, ("data", "teacher_holdout"), lambda config: not setting(config, "data", "teacher_holdout")),
    Addition(8, ("distill", "kd_ramp_iterations"), lambda config: not setting(config, "distill", "kd_ramp_iterations")),
    Addition(9, ("distill", "cross_head_weight"), lambda config: not setting(config, "distill", "cross_head_weight")),
)
VERSION = HISTORY[-1].version


def downgrade(config: dict, to_version: int = 1) -> dict:
    """``config`` written for ``to_version``: every setting a later version added is dropped where it computes what
    that version computed without it, and kept where the run needs it. Each setting's rule reads the whole config
    as given (one setting's rule may read another's value)."""
    written = config
    for addition in HISTORY:
        if addition.version > to_version and addition.as_before(config):
            written = without(written, addition.path)
    return written
