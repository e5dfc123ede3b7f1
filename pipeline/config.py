"""Typed configuration: TOML files parsed into frozen dataclasses.

Precedence: `--set section.key=value` overrides beat the TOML file, which beats the dataclass defaults. A named
flavor (`debug`, `demo`, `paper`) is a TOML file shipped in `pipeline/configs/<kind>/<flavor>.toml`, so
`--config demo` and `--config path/to/file.toml` go through the same code. Unknown keys and wrong types are errors
that name the offending key. Every number in a config is a size, count, rate, weight, probability, seed or time, so
besides each dataclass's own checks (`__post_init__`, whose messages come first), a number that is negative, NaN or
infinite is refused at load, naming its key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

CONFIG_DIR = Path(__file__).parent / "configs"
# (kind, flavor) -> the flavor file it names: the paper's LLM flavor is its 1B model, and each of the paper's model
# sizes trains with the paper's (cluster) settings
ALIASES = {("llm", "paper"): "1b", **{("train_llm", size): "paper" for size in ("300m", "1b", "8b")}}

# Metadata of fields that change how a model runs (attention kernel, compilation), not what it computes: checkpoint
# fingerprints leave them out (`identity_json`), so a checkpoint keeps its identity when they change.
RUNTIME = {"runtime": True}

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or value that does not fit its dataclass."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where TOML cannot express the type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass `cls` from a (nested) dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known keys of {cls.__name__}: {known})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check (`__post_init__`): say which section of the file it is
        raise ConfigError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None
    for name, value in kwargs.items():
        _check_numbers(value, f"{prefix}{name}")
    return cfg


def _check_numbers(value: Any, key: str) -> None:
    """Refuse a negative or non-finite number in a field's value (nested sections check their own)."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_numbers(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_numbers(item, f"{key}.{name}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def identity_json(cfg: Any) -> str:
    """`to_json` without the config's RUNTIME fields."""
    data = to_dict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("runtime"):
            del data[f.name]
    return json.dumps(data, indent=2, sort_keys=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML, or as a bare string if that fails."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8; tomllib raises the codec's error
        raise ConfigError(f"config file {path}: {e}") from None


def flavor_path(kind: str, flavor: str) -> Path:
    path = CONFIG_DIR / kind / f"{ALIASES.get((kind, flavor), flavor)}.toml"
    if not path.exists():
        available = sorted([p.stem for p in (CONFIG_DIR / kind).glob("*.toml")] + [f for k, f in ALIASES if k == kind])
        raise ConfigError(f"no flavor {flavor!r} for {kind} configs (available: {', '.join(available)})")
    return path


def load_config(cls: type[T], source: str | Path | None = None, overrides: typing.Iterable[str] = (),
                kind: str | Mapping[str, str] | None = None) -> T:
    """Resolve a config: dataclass defaults <- TOML file <- `section.key=value` overrides.

    `source` is a TOML path or a flavor name. With `kind="video_tokenizer"` a flavor is one file of that kind. An app
    config made of sections takes `kind={"": "train_video_tokenizer", "model": "video_tokenizer"}`: a flavor name
    then assembles each section from its own kind's flavor file, "" being the app's own file of top-level keys and
    remaining sections; sections without a file keep their defaults.
    """
    data: dict[str, Any] = {}
    if source is not None:
        source = str(source)
        if kind is not None and not source.endswith(".toml") and "/" not in source:
            if isinstance(kind, str):
                data = read_toml(flavor_path(kind, source))
            else:
                paths = {section: CONFIG_DIR / k / f"{ALIASES.get((k, source), source)}.toml"
                         for section, k in kind.items()}
                if not any(path.exists() for path in paths.values()):
                    flavor_path(next(iter(kind.values())), source)  # raises, listing the flavors there are
                for section, path in paths.items():
                    if path.exists():
                        if section:
                            data[section] = read_toml(path)
                        else:
                            data.update(read_toml(path))
        else:
            data = read_toml(source)
    return from_dict(cls, apply_overrides(data, overrides))
