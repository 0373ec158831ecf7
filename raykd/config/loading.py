"""Reading configs: YAML files with ``base:`` inheritance and dotted ``key=value`` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raykd.config.base import ConfigError


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "students":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded or {}


def _with_bases(tree: dict[str, Any], path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """``tree`` (read from ``path``) with every ``base:`` of its mappings, at any depth, replaced by
    that file's tree (its own bases resolved) merged under the mapping: the mapping wins."""
    out = {k: _with_bases(v, path, chain) if isinstance(v, dict) else v for k, v in tree.items() if k != "base"}
    if "base" not in tree:
        return out
    name = str(tree["base"])
    found = [b for b in (path.parent / name, Path(name)) if b.is_file()]
    if not found:
        raise ConfigError(f"base: {name} does not exist (looked beside {path} and in the working folder)")
    base = found[0].resolve()
    if base in chain:
        loop = " -> ".join(str(p) for p in (*chain, base))
        raise ConfigError(f"base: {name} in {path} inherits from itself ({loop}); remove one of the base: lines")
    return _merge(_with_bases(_read_yaml(base), base, (*chain, base)), out)


def read_config_tree(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds, with its ``base:`` files merged in.

    A mapping (the whole file or any section) may say ``base: <file>``: that YAML file (beside this
    one, else from the working folder) is read, its own ``base:`` lines resolved, and this
    mapping's keys are merged on top of it, section by section (this file wins; a
    ``train.students`` mapping is replaced whole, never merged).

    Raises:
        ConfigError: a file is missing or not a mapping, or the ``base:`` files form a loop.
    """
    p = Path(path)
    return _with_bases(_read_yaml(p), p, (p.resolve(),))


def load_config(
    model: type[BaseModel], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """Load a config model from YAML (with ``base:`` inheritance) plus dotted overrides.

    Args:
        model: the pydantic config class (e.g. :class:`DistillConfig`).
        path: YAML file, or None for the defaults; see :func:`read_config_tree` for ``base:``.
        overrides: ``key=value`` strings applied on top of the file.

    Raises:
        ConfigError: a file is missing or not a mapping, the ``base:`` files form a loop, an
            override is malformed, or a field is unknown or out of range (the message lists each
            bad field).
    """
    tree = read_config_tree(path) if path is not None else {}
    tree = _merge(tree, parse_overrides(list(overrides)))
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc or '<root>'}: {err['msg']}")
        src = f" ({path})" if path else ""
        raise ConfigError(f"invalid {model.__name__}{src}:\n" + "\n".join(lines)) from None
