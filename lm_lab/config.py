"""Typed configuration dataclasses shared by the model, task and data layers.

Every config is a plain dataclass: Hydra instantiates it from YAML in ``train()`` and nothing
below ``train()`` sees a ``DictConfig``. ``ConfigBase.__post_init__`` checks field types, so a
wrong type fails at start-up with the key's name (unknown keys already fail in the dataclass
constructor, which names the unexpected keyword).
"""

from __future__ import annotations

import dataclasses
import math
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


@dataclasses.dataclass
class OptimizerConfig(ConfigBase):
    """AdamW settings. Weight decay applies only to matrices (not biases, norms, embeddings' 1-D)."""

    _section: typing.ClassVar[str] = "optimizer"
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool | None = None

    def validate(self) -> None:
        # inf passes "> 0" and turns every weight into NaN at the first step (nan fails the comparison).
        self.require(
            math.isfinite(self.lr) and self.lr > 0,
            f"optimizer.lr={self.lr} must be > 0 and finite: pass a positive learning rate",
        )
        self.require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1)",
        )
        self.require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"optimizer.weight_decay={self.weight_decay} must be >= 0 and finite",
        )
        self.require(math.isfinite(self.eps) and self.eps > 0, f"optimizer.eps={self.eps} must be > 0 and finite")


@dataclasses.dataclass
class SchedulerConfig(ConfigBase):
    """Linear warm-up then decay to ``min_lr`` (cosine or linear) over ``decay_steps``.

    ``decay_steps=None`` means "until trainer.max_steps", resolved in ``train()``.
    """

    _section: typing.ClassVar[str] = "scheduler"
    warmup_steps: int = 100
    min_lr: float = 6e-5
    decay_steps: int | None = None
    kind: typing.Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self) -> None:
        self.require(self.warmup_steps >= 0, f"scheduler.warmup_steps={self.warmup_steps} must be >= 0")
        self.require(
            math.isfinite(self.min_lr) and self.min_lr >= 0, f"scheduler.min_lr={self.min_lr} must be >= 0 and finite"
        )
        self.require(
            self.decay_steps is None or self.decay_steps > 0,
            f"scheduler.decay_steps={self.decay_steps} must be > 0 (or null for trainer.max_steps)",
        )
