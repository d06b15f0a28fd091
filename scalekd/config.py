"""One typed configuration for every stage, loaded from YAML and validated once, at the edge.

Errors name the dotted field, the bad value and what is allowed. Code below the edge trusts the config.
The same plain dict (``to_dict``) is Ray's ``train_loop_config`` and the base of Tune's search space.
This module loads (defaults, presets, files, overrides, earlier config versions); the sections are
``scalekd.config_schema`` and their checks ``scalekd.config_validation``, both importable from here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import types
import typing
from typing import Any, Literal

import yaml

from scalekd.config_schema import (
    ASSIGNERS, AUTO_CROSS_HEAD_WEIGHT, BACKBONES, BOX_LOSSES, CSAConfig, Config, ConfigError, CrossKDConfig,
    DETECTORS, DataConfig, DistillConfig, EvalConfig, ExperimentalConfig, MAX_FPN_CHANNELS, ModelConfig, ONE_STAGE,
    PAIRINGS, PAPER_RECIPE, PAPER_WEIGHTS, SDFConfig, ScalingConfig, StorageConfig, TrainConfig,
)
from scalekd.config_validation import validate

__all__ = ["ASSIGNERS", "AUTO_CROSS_HEAD_WEIGHT", "BACKBONES", "BOX_LOSSES", "CSAConfig", "Config", "ConfigError",
           "CrossKDConfig", "DETECTORS", "DataConfig", "DistillConfig", "EvalConfig", "ExperimentalConfig",
           "MAX_FPN_CHANNELS", "ModelConfig", "ONE_STAGE", "PAIRINGS", "PAPER_RECIPE", "PAPER_WEIGHTS", "SDFConfig",
           "ScalingConfig", "StorageConfig", "TrainConfig", "apply_recipe", "config_from_dict", "load_config",
           "paper_recipe", "parse_yaml", "PRESETS", "replace", "validate"]

log = logging.getLogger(__name__)


class _ConfigLoader(yaml.SafeLoader):
    """YAML as people write configs: ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``), a key given twice in one
    mapping is an error instead of silently keeping the last, and merge keys (``<<: *base``) work."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" merges; the mapping's own keys then override the merged ones
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str):
    """YAML through the config loader (numbers in exponent form, duplicate keys refused)."""
    return yaml.load(text, Loader=_ConfigLoader)


def _load_presets() -> dict[str, dict]:
    """The presets shipped in the package (``scalekd/presets/NAME.yaml``): overrides on the defaults, each file
    values only; what they rest on is in docs/presets.md."""
    from importlib import resources

    folder = resources.files("scalekd") / "presets"
    return {entry.name[: -len(".yaml")]: parse_yaml(entry.read_text(encoding="utf-8")) or {}
            for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".yaml")}


PRESETS: dict[str, dict] = _load_presets()


def load_config(path: str | None = None, preset: str | None = None,
                overrides: list[str] | None = None, text: str | None = None) -> Config:
    """Defaults <- preset <- YAML file (or text) <- `key=value` overrides; then validate."""
    merged: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError("preset", preset, f"one of {', '.join(PRESETS)}")
        merged = copy.deepcopy(PRESETS[preset])
    if text is None and path is not None:
        from scalekd import storage

        if not storage.is_s3(path) and os.path.isdir(path):
            raise ConfigError("--config", path, "is a folder; give a YAML file")
        text = storage.read_text(path)  # names the file and the byte when it is not UTF-8
    if text is not None:
        try:
            loaded = parse_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", path or "<text>", f"not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", loaded, "a mapping of sections (data, model, distill, ...)")
        _deep_update(merged, loaded)
    _apply_overrides(merged, overrides or [])
    merged, moves = _upgraded(merged)
    for move in moves:  # a user's file or override written for an earlier version: say where the setting lives now
        log.warning("%s is now %s (config version %d); the old name still works", ".".join(move.old),
                    ".".join(move.new), move.version)
    return config_from_dict(apply_recipe(merged))


def paper_recipe(student_min_level: int) -> dict:
    """The distill fields ``recipe=paper`` sets. A P2-P6 student keeps scale-aligned pairing and its rates: the
    teacher has no P2, pairing the lists by position (the paper's P3-P7 with P3-P7) is then scale alignment
    anyway, and the paper's rates 2 and 4 on a 2x map are rates 1 and 2 on the scale-aligned map."""
    fields = copy.deepcopy(PAPER_RECIPE)
    if student_min_level == 2:
        del fields["pairing"], fields["csa"]["rates"]
    return fields


def apply_recipe(raw: dict) -> dict:
    """``distill.recipe=paper``: the paper's settings beneath whatever the raw config sets itself."""
    distill = raw.get("distill")
    if isinstance(distill, dict) and distill.get("recipe") == "paper":
        model = raw.get("model")
        model = model if isinstance(model, dict) else {}
        base = paper_recipe(model.get("student_min_level", ModelConfig.student_min_level))
        _deep_update(base, distill)
        raw = {**raw, "distill": base}
    return raw


def _apply_overrides(merged: dict, overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, item, "overrides look like section.field=value")
        node = merged
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, raw, f"'{part}' is not a section")
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(key, raw, f"a YAML value ({exc.problem or exc})") from None


def config_from_dict(raw: dict) -> Config:
    """The typed, validated config; the edge where an endpoint's credentials leave it (``storage.adopt_endpoint``):
    the config, and every model, checkpoint and card that stores it, holds the clean URL only."""
    from scalekd import storage

    cfg = _build(Config, _upgraded(raw)[0] if isinstance(raw, dict) else raw, "")
    validate(cfg)
    clean = storage.adopt_endpoint(cfg.storage.endpoint_url)
    return cfg if clean == cfg.storage.endpoint_url else replace(cfg, storage={"endpoint_url": clean})


def _upgraded(raw: dict) -> tuple[dict, list]:
    """``raw`` with settings written at their place in an earlier config version moved to today's
    (``scalekd.config_versions.upgrade``: models and checkpoints store the config they ran)."""
    from scalekd.config_versions import MovedTwiceError, setting, upgrade

    try:
        return upgrade(raw)
    except MovedTwiceError as exc:
        old, new = exc.args
        raise ConfigError(old, setting(raw, *old.split(".")), f"set at {new} too: give it once, at {new} (config "
                          f"version 10 moved it there)") from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", raw, "a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, raw[unknown[0]], f"unknown field; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        allowed = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, path)
            except ConfigError as exc:
                allowed.append(exc.allowed)
        raise ConfigError(path, value, " or ".join(allowed))
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(path, value, " or ".join(repr(a) for a in args))
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, "a list")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(path, value, "a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with fields of named sections replaced, validated again."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        _deep_update(raw.setdefault(section, {}), values)
    return config_from_dict(raw)


def _deep_update(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
