"""The config's versions: a setting added to the schema needs an entry in the history, or every finished stage's
reuse key would change with it."""

import json
from pathlib import Path

import logging

import pytest

from scalekd.config import PRESETS, ConfigError, config_from_dict, load_config, replace
from scalekd.config_versions import HISTORY, MOVES, VERSION, Addition, downgrade, setting, upgrade

V1 = Path(__file__).parent / "data" / "config_v1_settings.json"


def _leaves(config: dict, prefix: tuple[str, ...] = ()):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _added(path: tuple[str, ...]) -> bool:
    return any(path[:len(addition.path)] == addition.path for addition in HISTORY if isinstance(addition, Addition))


def _before_moves(path: tuple[str, ...]) -> tuple[str, ...]:
    """Where a setting of today's schema was written before any version moved it."""
    return next((move.old for move in MOVES if move.new == path), path)


def test_every_setting_of_the_schema_is_version_one_s_or_has_a_version_in_the_history():
    version_one = set(json.loads(V1.read_text())["settings"])
    for preset in PRESETS:
        paths = {".".join(path) for path in map(_before_moves, _leaves(load_config(preset=preset).to_dict()))
                 if not _added(path)}
        assert paths - version_one == set(), (
            f"preset {preset}: settings with no entry in scalekd.config_versions.HISTORY; add one (a new version) "
            "whose as_before says when the setting computes what runs before it computed")
        assert version_one - paths == set(), f"preset {preset}: version-1 settings gone; an upgrade must say where"


def test_versions_follow_one_another_and_name_settings_that_exist():
    versions = [entry.version for entry in HISTORY]
    assert versions == sorted(versions) and sorted(set(versions)) == list(range(2, VERSION + 1))
    defaults = load_config(preset="tiny").to_dict()
    for addition in HISTORY:
        if isinstance(addition, Addition):
            *section, name = next((m.new for m in MOVES if m.old == addition.path), addition.path)
            assert name in setting(defaults, *section), addition.path
    for move in MOVES:
        assert setting(defaults, *move.new) is not None and setting(defaults, *move.old) is None, move


def test_a_config_written_before_a_move_loads_as_today_s_and_keys_as_before(caplog):
    today = replace(load_config(preset="tiny"), experimental={"assigner": "atss", "teacher_sdf": "frozen",
                                                                "csa_recompute": True}).to_dict()
    written_before = downgrade(today, to_version=VERSION - 1)
    assert setting(written_before, "model", "assigner") == "atss" and "experimental" not in written_before
    assert setting(written_before, "distill", "sdf", "teacher_sdf") == "frozen"
    assert config_from_dict(written_before).to_dict() == today  # a model or checkpoint that stored the old form
    assert upgrade(written_before)[0] == today and len(upgrade(written_before)[1]) == len(MOVES)
    assert downgrade(written_before) == downgrade(today)  # the same reuse key
    with caplog.at_level(logging.WARNING, logger="scalekd.config"):
        cfg = load_config(preset="tiny", overrides=["model.assigner=atss"])
    assert cfg.experimental.assigner == "atss"
    assert "model.assigner is now experimental.assigner" in caplog.text


def test_a_moved_setting_given_at_both_places_is_refused_naming_both():
    with pytest.raises(ConfigError, match="model.box_loss.*experimental.box_loss"):
        load_config(preset="tiny", overrides=["model.box_loss=giou", "experimental.box_loss=l1"])


def test_a_config_written_for_an_earlier_version_drops_later_settings_only_where_they_change_nothing():
    cfg = load_config(preset="tiny")
    ramped = replace(cfg, distill={"kd_ramp_iterations": 50, "cross_head_weight": 0.0}).to_dict()
    oldest = downgrade(ramped)
    assert setting(oldest, "distill", "kd_ramp_iterations") == 50  # the run needs version 8
    assert "cross_head_weight" not in oldest["distill"] and "crosskd" not in oldest["distill"]
    assert "box_loss" not in oldest["model"] and "atss_topk" not in oldest["model"]
    assert "cross_head_weight" in downgrade(ramped, to_version=9)["distill"]
    assert downgrade(ramped, to_version=VERSION) == ramped
    assert ramped == replace(cfg, distill={"kd_ramp_iterations": 50, "cross_head_weight": 0.0}).to_dict()  # a copy


def test_each_setting_is_judged_on_the_whole_config_not_on_what_earlier_rules_dropped():
    crosskd_read = replace(load_config(preset="tiny"), distill={"cross_head_weight": 2.0}).to_dict()
    assert "crosskd" in downgrade(crosskd_read)["distill"]  # ScaleKD's cross-head terms read CrossKD's settings
