"""One way to type a config: plain data (yaml, a resolved Hydra/OmegaConf node) -> annotated dataclasses.

Every job's loader (``preprocess.config.to_config``, ``train.config.to_job``, ``train.data.to_config``,
``models.config.ModelConfig.from_dict``) goes through :func:`build`; every problem it or a job's own value
checks find is a :class:`ConfigError` whose message names the key (``plan.min_frames``) and what is wrong.

Types understood: dataclasses (unknown keys refused; a missing key is an error unless the field has a
default), ``X | None``, unions (first type that fits), ``tuple[...]``, ``list[X]``, ``dict[str, X]``,
``Any``, :class:`Choice` enums (a string from a fixed set: checked against the enum, kept as its plain
value, which compares equal to the member) and the scalars (an int is a float; a bool is not an int).
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what to do."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigKeyError(ConfigError, KeyError):
    """An unknown or missing key."""


class ConfigTypeError(ConfigError, TypeError):
    """A value of the wrong type or outside a fixed set of choices."""


class Choice(str, enum.Enum):
    """A string from a fixed set: compares, formats and serialises as its value."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


def key(path: str) -> str:
    """The key as users type it (the root config passes path ``""``: ``.plan.min_frames`` -> ``plan.min_frames``)."""
    return path.lstrip(".") or "<config>"


def build(tp, value, path: str):
    """``value`` as the annotated type ``tp``; ``path`` names it in errors (``job.section.key``)."""
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return build(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        names = [getattr(a, "__name__", str(a)) for a in inner]
        raise ConfigTypeError(f"{key(path)}={value!r} is none of {names} ({'; '.join(errors)})")
    if origin is tuple:
        items = _sequence(value, path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(build(args[0], v, f"{path}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise ConfigTypeError(f"{key(path)}: expected {len(args)} items, got {len(items)}")
        return tuple(build(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, items, strict=True)))
    if origin is list:
        items = _sequence(value, path)
        return [build(args[0], v, f"{path}[{i}]") for i, v in enumerate(items)] if args else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{key(path)}: expected a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {k: v if inner is Any else build(inner, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any or tp is object:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            member = tp(value)
        except ValueError:
            raise ConfigTypeError(f"{key(path)}={value!r}: use one of {', '.join(str(m.value) for m in tp)}") from None
        # the plain value: equal to the member, and accepted where C extensions (PyAV) refuse str subclasses
        return member.value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigTypeError(f"{key(path)}: expected {tp.__name__}, got {value!r}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigTypeError(f"{key(path)}: expected {tp.__name__}, got {value!r}")
    return value


def _sequence(value, path: str) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigTypeError(f"{key(path)}: expected a list, got {value!r}")
    return list(value)


def _dataclass(tp, value, path: str):
    if not isinstance(value, dict):
        raise ConfigTypeError(f"{key(path)}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    fields = [f for f in dataclasses.fields(tp) if f.init]
    names = [f.name for f in fields]
    unknown = sorted(set(value) - set(names))
    missing = [f.name for f in fields if f.name not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        raise ConfigKeyError(f"{key(path)}: unknown keys {unknown}, missing keys {missing}"
                             + (f" (known: {', '.join(names)})" if unknown else ""))
    return tp(**{n: build(hints[n], value[n], f"{path}.{n}") for n in names if n in value})


def resolved(node) -> Any:
    """A Hydra/OmegaConf node (or plain data) as plain resolved data; interpolation errors become ConfigError."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # plain data only (e.g. a GPU box with PyYAML and no Hydra)
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception as e:  # noqa: BLE001 - OmegaConf names the key (e.g. an unset ${oc.env:...})
            raise ConfigError(" ".join(str(e).split())) from None
    return node


def from_node(cls, node, path: str):
    """The one loader: a composed node (or plain data) checked and typed as the dataclass ``cls``."""
    return build(cls, resolved(node), path)
