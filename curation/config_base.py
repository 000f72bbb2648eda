"""The config base shared by the curation and the trainer configs (``curation/config.py``, ``training/config.py``).

One strict pydantic base (unknown keys are refused), one :class:`ConfigError`, one ``key.path=value`` override
applier, one YAML reader and one way of wording problems: every error is a single line that starts with
``config error:`` and names the key path (``download.timeout_s: ...``, ``optim.base_lr: ...``), so a typo or an
impossible value stops a command at once, before any work.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "ConfigModel", "Precision", "apply_overrides", "parse_override", "parse_yaml",
           "read_yaml_mapping", "format_validation_error", "moved_keys_error", "validate_config"]

Precision = Literal["auto", "bf16", "fp32"]
"""Compute precision of a model: auto = bf16 autocast on CUDA, fp32 on CPU (bf16 applies on CUDA only)."""

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem, worded as one line naming the key path: ``config error: dedup.k: ...``."""


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are an error (``timout_s`` is a typo, not a new setting)."""

    model_config = ConfigDict(extra="forbid")


# -- YAML --------------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e12`` (no dot) is a string; config numbers follow YAML 1.2: it is a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


#: the deepest nesting of lists and mappings a config value may have (real configs use three or four levels; the
#: bound keeps validation, overrides and dumps far from Python's recursion limit)
MAX_NESTING = 50


class NestedTooDeep(yaml.YAMLError):
    def __init__(self):
        super().__init__(f"nested more than {MAX_NESTING} levels deep (lists or mappings inside each other); "
                         "a config needs only a few levels")


def _depth_exceeds(data: Any, limit: int) -> bool:
    """True when lists/mappings nest deeper than `limit` in `data` (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return False


def parse_yaml(text: str) -> Any:
    """YAML as Python values; a value nested too deeply (beyond :data:`MAX_NESTING`, or beyond what the parser's
    recursion can read) raises :class:`NestedTooDeep`, a ``yaml.YAMLError``."""
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise NestedTooDeep() from None
    if _depth_exceeds(data, MAX_NESTING):
        raise NestedTooDeep()
    return data


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (an empty file is an empty mapping); one-line errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config error: config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config error: {path} is not a file (give the YAML config file)")
    try:
        data = parse_yaml(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {path} is not a text file (give the YAML config file)") from None
    except OSError as err:
        raise ConfigError(f"config error: cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config error: {path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: the top level must be a mapping of sections")
    return data


# -- overrides ---------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], the value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like key.path=value")
    key, _, value = text.partition("=")
    try:
        return key.strip().split("."), parse_yaml(value)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        shown = text if len(text) <= 120 else text[:120] + "..."  # the line stays one line of a terminal or so
        raise ConfigError(f"config error: override {shown!r}: the value is not valid YAML ({problem})") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key.path=value`` on a copy of `data`; a number in the path indexes a list
    (``retrieve.anchor_sets.0.k=8``); a missing or non-mapping section on the way becomes a mapping."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(path[:i]) or "(top level)"
                    raise ConfigError(f"config error: override {text!r}: {where} is a list of {len(node)}, "
                                      f"{part!r} is not an index of it")
                part = int(part)
            elif not last and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            if last:
                node[part] = value
            else:
                node[part] = copy.deepcopy(node[part])  # never alter the caller's nested data
                node = node[part]
    return data


# -- validation --------------------------------------------------------------------------------------------------


def format_validation_error(err: ValidationError) -> str:
    """Every problem pydantic found, ``key.path: message (got value)``, on one line."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)) and str(e["input"]) not in msg:
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return "config error: " + "; ".join(parts)


def _has_key(data: Any, path: list[str]) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def moved_keys_error(data: dict, moved: dict[str, str]) -> str | None:
    """One line naming every old key present in `data` and what became of it (``moved``: old key path -> e.g.
    ``"moved to sscd.descriptor"``), or None when there is none."""
    found = [f"{old} {what}" for old, what in moved.items() if _has_key(data, old.split("."))]
    return ("config error: " + "; ".join(found)) if found else None


def validate_config(model: type[M], data: dict, moved: dict[str, str] | None = None) -> M:
    """`data` (a parsed YAML mapping, overrides applied) as a `model`; ConfigError with one line otherwise."""
    problem = moved_keys_error(data, moved or {})
    if problem:
        raise ConfigError(problem)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
