"""The run parameters a pipeline exposes over its preset: the one list that the kfp components, every pipeline, the
runner and ``scalekd pipeline --param`` are built from.

Each is optional: empty means the preset's value, and any other value is typed and checked here by name, so that 0
is 0 (``alpha=0`` turns distillation's feature term off) and nothing is silently read as "unset".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from scalekd.config import ConfigError


@dataclass(frozen=True)
class RunParameter:
    name: str
    field: str  # the config field it sets
    kind: type  # int, float, str or bool


RUN_PARAMETERS = (
    RunParameter("detector", "model.detector", str),
    RunParameter("student_backbone", "model.student_backbone", str),
    RunParameter("teacher_backbone", "model.teacher_backbone", str),
    RunParameter("student_size", "data.student_size", int),
    RunParameter("teacher_iterations", "train.teacher_iterations", int),
    RunParameter("warmup_iterations", "train.warmup_iterations", int),
    RunParameter("distill_iterations", "train.distill_iterations", int),
    RunParameter("alpha", "distill.alpha", float),
    RunParameter("beta", "distill.beta", float),
    RunParameter("gamma", "distill.gamma", float),
    RunParameter("ray_address", "scaling.ray_address", str),
    RunParameter("workers", "scaling.workers", int),
    RunParameter("gpu", "scaling.gpu", bool),
)


def parameter_names() -> list[str]:
    return [p.name for p in RUN_PARAMETERS]


def config_overrides(values: Mapping[str, object]) -> list[str]:
    """``field=value`` overrides for the parameters given a value ("" or None: the preset's). Raises ConfigError
    naming the parameter for an unknown name, a value of the wrong type, a negative or non-finite number, or a
    ``gpu`` that is not a boolean."""
    by_name = {p.name: p for p in RUN_PARAMETERS}
    overrides = []
    for name, value in values.items():
        if name not in by_name:
            raise ConfigError(f"--param {name}", value, f"one of {', '.join(by_name)}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        parameter = by_name[name]
        overrides.append(f"{parameter.field}={json.dumps(_typed(parameter, value))}")
    return overrides


def _typed(parameter: RunParameter, value: object):
    where = f"--param {parameter.name}"
    text = str(value).strip()
    if parameter.kind is bool:
        if isinstance(value, bool):
            return value
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(where, value, "true or false (empty: the preset's)")
        return text.lower() in ("true", "1", "yes")
    if parameter.kind is str:
        return text
    try:
        number = parameter.kind(text) if parameter.kind is float else _integer(text)
    except ValueError:
        raise ConfigError(where, value, f"{'an integer' if parameter.kind is int else 'a number'} "
                          "(empty: the preset's)") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(where, value, "a finite number >= 0 (empty: the preset's)")
    return number


def _integer(text: str) -> int:
    number = float(text)
    if not number.is_integer():
        raise ValueError(text)
    return int(number)
