"""YAML -> typed Config: `base:` inheritance, `a.b=value` overrides, key and type checks with suggestions.

A config file is looked up as given, then under `configs/` (with or without `.yaml`). Errors are raised as
ConfigError before anything starts; the CLI turns them into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from stereo.config.errors import ConfigError
from stereo.config.schema import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def find_config(name: str | Path) -> Path:
    candidates = [Path(name), CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(Path(str(name)).stem, known, n=1)
    raise ConfigError("config", f"no such config file {name!r} (known: {', '.join(known)})",
                      hint=close[0] if close else None)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one file and merge it over its `base:` chain."""
    if path.resolve() in chain:
        raise ConfigError("base", f"a chain without cycles, got {' -> '.join(str(p) for p in chain + (path,))}",
                          source=str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("yaml", f"valid YAML ({exc})", source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", f"a mapping, got {type(raw).__name__}", source=str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_yaml(find_config(base), chain + (path.resolve(),))
    return _merge(parent, raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict, text: str) -> None:
    if "=" not in text:
        raise ConfigError(text, "an override of the form a.b=value", source="command line")
    dotted, value = text.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{key} is not a section", source="command line")
    try:
        node[keys[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(dotted, f"a YAML value, got {text!r} ({problem})", source="command line") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(exc.expected)
        raise ConfigError(key, " or ".join(errors + (["null"] if type(None) in args else [])))
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:  # YAML 1.1 reads off/on as booleans
            return "on" if value else "off"
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise ConfigError(key, f"one of {', '.join(map(str, choices))}, got {value!r}",
                              hint=close[0] if close else None)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _nested_paths(cls: type, key: str, prefix: str) -> list[str]:
    """Dotted paths of every field named `key` in the sections below `cls` (`steps` -> `train.steps`)."""
    found, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            path = f"{prefix}.{f.name}" if prefix else f.name
            found += [f"{path}.{key}"] if key in {g.name for g in dataclasses.fields(tp)} else []
            found += _nested_paths(tp, key, path)
    return found


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = _nested_paths(cls, str(key), prefix) or [
                f"{prefix}.{name}" if prefix else name
                for name in difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)]
            raise ConfigError(dotted, "unknown key" if close else f"unknown key (valid: {', '.join(names)})",
                              hint=" or ".join(close) or None)
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return _build(Config, tree, "")
    except ConfigError as exc:
        raise exc.with_source(source) from None


def load_config(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config file with its base chain and command-line overrides into a validated Config."""
    path = find_config(name)
    tree = _read_yaml(path)
    tree.setdefault("name", path.stem)
    source = _shown(path)
    for text in overrides:
        _apply_override(tree, text)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return from_dict(tree, source)
    except ConfigError as exc:
        given = dict(text.split("=", 1) for text in overrides if "=" in text)
        if exc.hint and exc.key in given:  # a misplaced override (`steps=10`): suggest the whole assignment
            exc.hint = " or ".join(f"{hint}={given[exc.key]}" for hint in exc.hint.split(" or "))
            exc.args = (exc.render(),)
        raise


def _shown(path: Path) -> str:
    """A config path as the user would type it: relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The fully resolved config, as written into run directories and checkpoints."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b": value}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
