"""IsoFLOP runs (``experiment=scaling_*``): one compute budget C and one model size give the run's shape.

Hoffmann et al. (2022), approach 2: for each budget C, train several model sizes N, each for
D = C / (6 N) tokens, with a learning-rate schedule as long as the run. ``scaling.size`` names a
shape in ``scaling.shapes`` (the model keys it sets); N is counted on the network built from that
shape (every parameter, tied embeddings once); ``trainer.max_steps`` = D / tokens per step, rounded,
and the warm-up and decay follow it. ``train()`` calls :func:`plan_run` and writes the plan to
``scaling.json`` in the run directory, where ``lm_lab.report --scaling`` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lm_lab.schema import ConfigBase, ConfigError

PLAN_NAME = "scaling.json"


@dataclass
class ScalingConfig(ConfigBase):
    """``budget``: training FLOPs C (6 N D); ``size``: a key of ``shapes``; ``evals``: validations per run
    (the last at the final step); ``warmup_fraction``: warm-up steps as a share of the run."""

    _section: ClassVar[str] = "scaling"
    budget: float = 1e12
    size: str = ""
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    warmup_fraction: float = 0.05
    evals: int = 4

    def validate(self) -> None:
        self.require(self.budget > 0, f"scaling.budget={self.budget} must be > 0 (training FLOPs, e.g. 1e13)")
        self.require(bool(self.shapes), "scaling.shapes is empty: give {name: {n_layer: .., n_embd: ..}, ...}")
        self.require(
            self.size in self.shapes,
            f"scaling.size={self.size!r} is not a shape of scaling.shapes: choose one of {', '.join(self.shapes)}",
        )
        self.require(0 <= self.warmup_fraction < 1, f"scaling.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        self.require(self.evals >= 1, f"scaling.evals={self.evals} must be >= 1")


@dataclass(frozen=True)
class ScalingPlan:
    model_cfg: Any
    scheduler: Any
    n_params: int
    max_steps: int
    tokens_per_step: int
    val_check_interval: int
    budget: float
    size: str

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step

    def record(self) -> dict[str, Any]:
        """What ``scaling.json`` holds: the budget asked for and the run actually planned (its FLOPs
        differ from the budget by the rounding of the step count)."""
        return {
            "budget": self.budget,
            "size": self.size,
            "n_params": self.n_params,
            "tokens": self.tokens,
            "flops": 6 * self.n_params * self.tokens,
            "max_steps": self.max_steps,
            "tokens_per_step": self.tokens_per_step,
        }


def count_params(model_cfg: Any) -> int:
    """Parameters of the network ``model_cfg`` builds (shared tensors once), built on the meta device."""
    import torch

    from lm_lab import registry

    with torch.device("meta"):
        net = registry.network_of(model_cfg).build(model_cfg)
    return sum(p.numel() for p in net.parameters())


def plan_run(scaling: ScalingConfig, model_cfg: Any, scheduler: Any, tokens_per_step: int) -> ScalingPlan:
    """The shape, step count, schedule and validation interval of one IsoFLOP run.

    ``model_cfg`` must have its ``vocab_size`` (the embedding counts in N)."""
    shape = scaling.shapes[scaling.size]
    unknown = sorted(set(shape) - {f.name for f in dataclasses.fields(model_cfg)})
    if unknown:
        raise ConfigError(f"scaling.shapes.{scaling.size}.{unknown[0]} is not a model key: see conf/model/")
    model_cfg = dataclasses.replace(model_cfg, **shape)
    n = count_params(model_cfg)
    tokens = scaling.budget / (6 * n)
    steps = round(tokens / tokens_per_step)
    if steps < 1:
        raise ConfigError(
            f"scaling.budget={scaling.budget:g} gives size {scaling.size} ({n:,} parameters) {tokens:,.0f} tokens, "
            f"less than one step of {tokens_per_step:,}: raise scaling.budget or drop the size"
        )
    scheduler = dataclasses.replace(scheduler, warmup_steps=round(scaling.warmup_fraction * steps), decay_steps=steps)
    return ScalingPlan(
        model_cfg=model_cfg,
        scheduler=scheduler,
        n_params=n,
        max_steps=steps,
        tokens_per_step=tokens_per_step,
        val_check_interval=max(1, steps // scaling.evals),
        budget=float(scaling.budget),
        size=scaling.size,
    )
