"""The config's versions: a setting added to the schema needs an entry in the history, or every finished stage's
reuse key would change with it."""

import json
from pathlib import Path

from scalekd.config import PRESETS, load_config, replace
from scalekd.config_versions import HISTORY, VERSION, downgrade, setting

V1 = Path(__file__).parent / "data" / "config_v1_settings.json"


def _leaves(config: dict, prefix: tuple[str, ...] = ()):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _added(path: tuple[str, ...]) -> bool:
    return any(path[:len(addition.path)] == addition.path for addition in HISTORY)


def test_every_setting_of_the_schema_is_version_one_s_or_has_a_version_in_the_history():
    version_one = set(json.loads(V1.read_text())["settings"])
    for preset in PRESETS:
        paths = {".".join(path) for path in _leaves(load_config(preset=preset).to_dict()) if not _added(path)}
        assert paths - version_one == set(), (
            f"preset {preset}: settings with no entry in scalekd.config_versions.HISTORY; add one (a new version) "
            "whose as_before says when the setting computes what runs before it computed")
        assert version_one - paths == set(), f"preset {preset}: version-1 settings gone; an upgrade must say where"


def test_versions_follow_one_another_and_name_settings_that_exist():
    assert [addition.version for addition in HISTORY] == list(range(2, VERSION + 1))
    defaults = load_config(preset="tiny").to_dict()
    for addition in HISTORY:
        *section, name = addition.path
        assert name in setting(defaults, *section), addition.path


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
