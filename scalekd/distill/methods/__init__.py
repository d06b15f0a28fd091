"""The distillation methods, one class per module, registered by name (``distill.method``).

Every module in this package is imported on first lookup, so a new method is one new file with a ``@register``
class (and its tests). The config reads a method's facts (its default weights, what it needs from the teacher, its
own checks) through ``method_class`` when it validates, and ``scalekd config`` runs where torch does not: so these
modules import torch and their modules (SDF, the assistant, the losses) where a method is built or run, not at the
top.
"""

from __future__ import annotations

import importlib
import pkgutil

from scalekd.distill.methods.base import DistillMethod, register, registered

__all__ = ["DistillMethod", "method_class", "method_names", "register"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def method_names() -> tuple[str, ...]:
    """Every registered method's name."""
    _load_all()
    return tuple(registered())


def method_class(name: str) -> type[DistillMethod]:
    """The class registered as ``name``; KeyError naming the known ones otherwise."""
    _load_all()
    methods = registered()
    if name not in methods:
        raise KeyError(f"no distillation method {name!r}; one of {', '.join(methods)}")
    return methods[name]
