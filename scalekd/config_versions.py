"""The config's versions: which setting each version added or moved, and how a config is written for an earlier
version (detectron2's config ``VERSION`` with its upgrade/downgrade functions).

Every setting a version added has a default that computes what earlier versions computed without it. A config is
*downgraded* by dropping each later setting where it holds such a value, so the oldest form that expresses a run is
the one a stage's reuse key is computed over (``scalekd.train.keys``): adding a setting means one entry here and a
version bump, and leaves the key of every stage finished before it as it was. Upgrading an older config is filling
the new settings' defaults, which loading a config does (``scalekd.config.config_from_dict``), and moving a
setting written at its old place to its new one (``upgrade``); a downgrade moves it back.
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


@dataclass(frozen=True)
class Move:
    """A setting that config ``version`` moved from ``old`` to ``new`` (same meaning, same values)."""

    version: int
    old: tuple[str, ...]
    new: tuple[str, ...]


def _crosskd_unread(config: dict) -> bool:
    """CrossKD's settings are read by CrossKD alone, or by ScaleKD with cross-head terms beside it."""
    return setting(config, "distill", "method") != "crosskd" and not setting(config, "distill", "cross_head_weight")


HISTORY: tuple[Addition | Move, ...] = (
    Addition(2, ("model", "box_loss"), lambda config: setting(config, "model", "box_loss") in (None, "l1")),
    Addition(3, ("model", "atss_topk"), lambda config: setting(config, "model", "assigner") != "atss"),
    Addition(4, ("distill", "csa", "head_lr"), lambda config: setting(config, "distill", "csa", "head_lr") is None),
    Addition(5, ("distill", "csa", "teacher_anchor"),
             lambda config: not setting(config, "distill", "csa", "teacher_anchor")),
    Addition(6, ("distill", "crosskd"), _crosskd_unread),
    Addition(7, ("data", "teacher_holdout"), lambda config: not setting(config, "data", "teacher_holdout")),
    Addition(8, ("distill", "kd_ramp_iterations"), lambda config: not setting(config, "distill", "kd_ramp_iterations")),
    Addition(9, ("distill", "cross_head_weight"), lambda config: not setting(config, "distill", "cross_head_weight")),
    # Options measured no better than their defaults go to one section (scalekd.config.ExperimentalConfig).
    Move(10, ("model", "assigner"), ("experimental", "assigner")),
    Move(10, ("model", "atss_topk"), ("experimental", "atss_topk")),
    Move(10, ("model", "positive_iou"), ("experimental", "positive_iou")),
    Move(10, ("model", "negative_iou"), ("experimental", "negative_iou")),
    Move(10, ("model", "box_loss"), ("experimental", "box_loss")),
    Move(10, ("distill", "sdf", "teacher_sdf"), ("experimental", "teacher_sdf")),
    Move(10, ("distill", "csa", "positional"), ("experimental", "csa_positional")),
    Move(10, ("distill", "csa", "recompute"), ("experimental", "csa_recompute")),
    Move(10, ("distill", "bbox_loss"), ("experimental", "bbox_loss")),
)
VERSION = HISTORY[-1].version
MOVES = tuple(entry for entry in HISTORY if isinstance(entry, Move))


class MovedTwiceError(ValueError):
    """A config that sets a moved setting at both its old and its new place."""


def _put(config: dict, path: tuple[str, ...], value: Any) -> dict:
    head, *rest = path
    if not rest:
        return {**config, head: value}
    inner = config.get(head)
    return {**config, head: _put(inner if isinstance(inner, dict) else {}, tuple(rest), value)}


def _present(config: dict, path: tuple[str, ...]) -> bool:
    *section, name = path
    inner = setting(config, *section) if section else config
    return isinstance(inner, dict) and name in inner


def upgrade(config: dict) -> tuple[dict, list[Move]]:
    """``config`` with every setting written at a place a later version moved it from moved to its new place,
    and the moves that applied (a loader may say so); a setting given at both places is refused."""
    applied = []
    for move in MOVES:
        if not _present(config, move.old):
            continue
        if _present(config, move.new):
            raise MovedTwiceError(".".join(move.old), ".".join(move.new))
        config = _put(without(config, move.old), move.new, setting(config, *move.old))
        applied.append(move)
    return config, applied


def downgrade(config: dict, to_version: int = 1) -> dict:
    """``config`` written for ``to_version``: every setting a later version moved goes back to its old place, and
    every setting a later version added is dropped where it computes what that version computed without it, and
    kept where the run needs it. Each setting's rule reads the whole config
    as given (one setting's rule may read another's value)."""
    for move in reversed(MOVES):
        if move.version > to_version and _present(config, move.new):
            config = _put(without(config, move.new), move.old, setting(config, *move.new))
    # A section that only moved settings filled (``experimental``) goes when they have all moved back.
    new_sections = {move.new[0] for move in MOVES if move.version > to_version}
    config = {k: v for k, v in config.items() if not (k in new_sections and v == {})}
    written = config
    for addition in HISTORY:
        if isinstance(addition, Addition) and addition.version > to_version and addition.as_before(config):
            written = without(written, addition.path)
    return written
