"""Typed configuration dataclasses shared by the model, task and data layers.

Every config is a plain dataclass: Hydra instantiates it from YAML in ``train()`` and nothing
below ``train()`` sees a ``DictConfig``. ``ConfigBase.__post_init__`` checks field types, so a
wrong type fails at start-up with the key's name (unknown keys already fail in the dataclass
constructor, which names the unexpected keyword).

Why not Hydra structured configs (ConfigStore schemas)? OmegaConf's typed nodes cannot hold the
types these configs use: ``Literal`` choices (``data.sampling``, ``objective.pair_objective``) and
unions of containers (``data.data_files`` is a path, a list or a split mapping); a schema would
have to widen them to ``Any``/``str`` and check them here anyway, and range checks (``lr > 0``)
need code in any case. The checks here give one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Union


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        elem = args[0]
        return all(_type_ok(v, elem) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


class ConfigBase:
    """Mixin for config dataclasses: checks field types after construction.

    Subclasses set ``_section`` (e.g. ``"model"``) so errors read ``model.n_layer``.
    """

    _section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            tp = hints[f.name]
            # YAML lists arrive as lists; keep tuples as tuples for hashing/equality.
            if typing.get_origin(tp) is tuple and isinstance(value, list):
                value = tuple(value)
                setattr(self, f.name, value)
            if not _type_ok(value, tp):
                raise ConfigError(f"{self.key(f.name)}={value!r} has the wrong type: expected {_describe(tp)}")
        self.validate()

    def key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def validate(self) -> None:
        """Range checks; override in subclasses and raise ``ConfigError``."""

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """Build from a plain mapping, naming any unknown key."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            prefix = f"{cls._section}." if cls._section else ""
            raise ConfigError(f"unknown config key {prefix}{unknown[0]}: valid keys are {', '.join(sorted(names))}")
        return cls(**values)


# Field metadata the resume checks read (``lm_lab.training.checkpoints.check_resume``): a field
# marked RESUME_FREE may change when a run resumes (dropout, workers, cache location); every other
# field of the model, objective and data configs must equal the checkpoint's. TOKENIZER marks the
# data fields that decide the tokenizer (a run started with init_from= keeps the checkpoint's).
RESUME_FREE: Mapping[str, Any] = types.MappingProxyType({"resume": "free"})
TOKENIZER: Mapping[str, Any] = types.MappingProxyType({"tokenizer": True})


def resume_fields(cfg: Any) -> list[str]:
    """The fields of config dataclass ``cfg`` that a resumed run must keep."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("resume") != "free"]


def tokenizer_fields(cfg: Any) -> list[str]:
    """The fields of ``cfg`` that decide its tokenizer."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("tokenizer")]
