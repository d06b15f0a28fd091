"""The configuration reference (docs/configuration.md), generated from the config dataclasses and the comments
beside their fields, so that the page cannot drift from the code: a test compares the two, and
``scalekd config --reference`` prints it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json

from scalekd import config_schema as config_module

HEADER = """# Configuration reference

Every field of the one typed config (`scalekd/config_schema.py`), generated from its dataclasses by
`scalekd config --reference > docs/configuration.md` (a test fails when this page is stale). Set a field with
`--set section.field=value`, in a YAML file (`--config`), or through a preset (`--preset tiny|demo|bench|paper`, whose
values `scalekd config --preset NAME` prints); a bad value fails at load, naming the field and what it accepts.
"Not in the paper" marks our departures; docs/method.md says why each exists.
"""


def reference_markdown() -> str:
    source = inspect.getsource(config_module)
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    lines = source.splitlines()
    sections = [HEADER]
    for prefix, cls in _sections(config_module.Config, ""):
        sections.append(_section(prefix, cls, classes[cls.__name__], lines))
    return "\n".join(sections)


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) for every nested config section, depth first, in declaration order."""
    out = [(prefix, cls)] if prefix else []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _sections(type(default), f"{prefix}{f.name}.")
    return out


def _section(prefix: str, cls: type, node: ast.ClassDef, lines: list[str]) -> str:
    rows = ["", f"## `{prefix.rstrip('.')}`", ""]
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(cls.__name__ + "("):
        rows += [" ".join(doc.split()), ""]
    rows += ["| field | default | type | meaning |", "|---|---|---|---|"]
    instance = cls()
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        name = statement.target.id
        value = getattr(instance, name)
        if dataclasses.is_dataclass(value):
            continue
        meaning = _comment(lines, statement.lineno).replace("|", "\\|")
        kind = ast.unparse(statement.annotation).replace("|", "or")
        rows.append(f"| `{prefix}{name}` | `{json.dumps(value)}` | {kind} | {meaning} |")
    return "\n".join(rows)


def _comment(lines: list[str], lineno: int) -> str:
    """The comment block right above a field and the comment at the end of its line, joined."""
    above: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].strip().startswith("#"):
        above.insert(0, lines[index].strip().lstrip("#").strip())
        index -= 1
    line = lines[lineno - 1]
    inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
    return " ".join(part for part in (" ".join(above), inline) if part)
