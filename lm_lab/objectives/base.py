"""What every objective shares: the network from the registry, the optimizer, the LR schedule,
token-weighted metrics, the tokenizer stored in the checkpoint, plain-container hyperparameters."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from tokenizers import Tokenizer
from torch import nn
from torchmetrics import MeanMetric

from lm_lab.training.optim import OptimizerConfig, SchedulerConfig
from lm_lab.training.schedule import lr_at

log = logging.getLogger("lm_lab")


@dataclasses.dataclass
class StepOutput:
    """What a task's ``_step`` returns for one micro-batch.

    ``loss`` is back-propagated; ``metrics`` maps a name to ``(mean, weight)``: the mean over the
    items the metric counts (target tokens, masked tokens, sentence pairs) and how many there were
    (0 for a batch with none, e.g. an evaluation padding slot). Aggregation divides summed
    ``mean * weight`` by summed weights, so every item weighs the same.
    """

    loss: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # Outside training: (predictions, targets) for the task's torchmetrics (``LMTask.eval_metrics``),
    # evaluation padding already removed.
    predictions: tuple[torch.Tensor, torch.Tensor] | None = None


class WeightedMeans:
    """Running sums of ``mean * weight`` and of ``weight`` per metric (detached, on device: no host
    sync per micro-batch), reduced over ranks with one all-reduce.

    Used for the per-step training metrics instead of torchmetrics (which the validation metrics
    use): a torchmetrics ``MeanMetric`` syncs by gathering each of its two states separately, so k
    metrics cost 2k blocking collectives per optimizer step; this packs everything, token count
    included, into one all-reduce.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None

    def add(self, metrics: dict[str, tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor | None = None) -> None:
        for name, (mean, weight) in metrics.items():
            w = weight.detach().to(torch.float64)
            s = mean.detach().to(torch.float64) * w
            if name in self.sums:
                self.sums[name] += s
                self.weights[name] += w
            else:
                self.sums[name], self.weights[name] = s, w
        if tokens is not None:
            t = tokens.detach().to(torch.float64)
            self.tokens = t if self.tokens is None else self.tokens + t

    def reduce(self, trainer: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(means over everything added on every rank, total tokens); then starts afresh."""
        names = sorted(self.sums)  # the same order on every rank
        device = trainer.strategy.root_device
        parts = [self.sums[n] for n in names] + [self.weights[n] for n in names]
        parts.append(self.tokens if self.tokens is not None else torch.zeros((), dtype=torch.float64))
        packed = torch.stack([p.to(device) for p in parts])
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        k = len(names)
        means = {n: (packed[i] / packed[k + i].clamp(min=1)).float() for i, n in enumerate(names)}
        tokens = packed[-1].round().long()
        self.__init__()
        return means, tokens


class LMTask(L.LightningModule):
    """What every objective's LightningModule shares: the network (built by the registry from the
    model config), the optimizer and schedule, token-weighted metrics over whole optimizer steps
    and ranks, the tokenizer stored in the checkpoint, and plain-container hyperparameters.

    A subclass (``lm_lab/objectives/<name>/task.py``) sets ``settings_class`` (its settings
    dataclass) and implements ``_step``; it may override ``build_net`` when it trains something
    other than the registry's ``lm`` module (a task head on the plain network).
    """

    settings_class: type = type(None)

    def __init__(
        self,
        model_cfg: Any,
        objective: Any = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        from lm_lab import registry

        super().__init__()
        objective = self.settings_class() if objective is None else objective
        self.network_spec, self.objective_spec = registry.check_combination(model_cfg, objective)
        self.model_cfg = model_cfg
        self.objective_cfg = objective
        self.optim_cfg = optimizer or OptimizerConfig()
        self.sched_cfg = scheduler or SchedulerConfig()
        cls = type(model_cfg)
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "network": self.network_spec.name,
                "objective": self.objective_spec.name,
                "model_class": f"{cls.__module__}:{cls.__qualname__}",  # imported to register a network from outside lm_lab
                "model": dataclasses.asdict(model_cfg),
                "objective_settings": dataclasses.asdict(objective),
                "optimizer": dataclasses.asdict(self.optim_cfg),
                "scheduler": dataclasses.asdict(self.sched_cfg),
            }
        )
        self.tokenizer_backend = tokenizer
        self._hf_tokenizer: Any = None
        # Counters live in buffers so they are saved and restored with the weights.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self._train_means = WeightedMeans()  # this optimizer step's micro-batches so far
        self.step_metrics: dict[str, Any] = {}  # the last optimizer step's train metrics (see on_before_optimizer_step)
        # This step's total gradient norm when callbacks.nonfinite computed it (plain tensors only):
        # gradient clipping then uses it instead of computing it a second time.
        self.step_grad_norm: torch.Tensor | None = None
        self._val_means: dict[str, Any] = {}
        self._eval_torchmetrics: dict[str, Any] = {}
        self.net = self.build_net()

    def build_net(self) -> nn.Module:
        """The module this objective trains (by default the registry's ``lm`` module of the network)."""
        return self.network_spec.build(self.model_cfg)

    def hf_files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config.json contents, weights under HF's names) of the ``transformers`` class this task
        exports as; by default the network's own mapping of its ``lm`` module (``models/<name>/hf.py``)."""
        mapping = self.network_spec.hf_module()
        return mapping.hf_config_dict(self.model_cfg), mapping.hf_state_dict(self.net)

    @classmethod
    def settings_from_hf(cls, hf_config: dict[str, Any]) -> Any:
        """This objective's settings for an exported directory's config.json (by default the defaults)."""
        return cls.settings_class()

    def load_hf_weights(self, weights: dict[str, Any]) -> None:
        """Load weights under HF's names (an exported directory) into ``self.net``, strictly."""
        self.network_spec.hf_module().load_hf_state_dict(self.net, weights)

    @property
    def network(self) -> str:
        """The registry name of the network (``gpt``, ``bert``, ``llama``, ...)."""
        return self.network_spec.name

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """The run's tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
        if self._hf_tokenizer is None and self.tokenizer_backend is not None:
            from lm_lab.data.tokenizer import to_hf

            self._hf_tokenizer = to_hf(self.tokenizer_backend)
        return self._hf_tokenizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_backend is not None:
            checkpoint["tokenizer_json"] = self.tokenizer_backend.to_str()
        # The arithmetic it was trained in (trainer.precision=auto picks it per machine): a resume in
        # another is named (training.checkpoints.check_resume).
        checkpoint["precision"] = str(self.trainer.precision)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``, which sets ``device_mesh``):
        shard the network with its transformer blocks as the units (``training.sharding``)."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from lm_lab.training.sharding import shard_blocks

        n = shard_blocks(self.net, mesh["data_parallel"], (self.network_spec.block_class(),))
        if n and self.global_rank == 0:
            log.info("fsdp: %d %s blocks sharded over %d processes", n, self.network_spec.name, mesh.size())

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                # Matrices (linear weights, embeddings) decay; biases and norm gains do not.
                (decay if p.dim() >= 2 else no_decay).append(p)
        o = self.optim_cfg
        fused = o.fused if o.fused is not None else self._fused_by_default()
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=fused,
        )
        s = self.sched_cfg
        decay_steps = s.decay_steps or self._max_steps()
        fn = functools.partial(
            lr_at, max_lr=o.lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, decay_steps=decay_steps, kind=s.kind
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: fn(step) / o.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_by_default(self) -> bool:
        """``optimizer.fused=null``: PyTorch's fused AdamW kernel on CPU and CUDA (on the nanoGPT char
        recipe's 0.8M parameters, 2 CPU threads: 0.45 ms a step against 2.0 ms for the for-loop that
        torch picks on CPU, 3.1 ms for foreach; ``bench/cpu_levers.py``), except where gradients are
        unscaled by a loss scaler (``16-mixed``): Lightning refuses to clip the gradients of an
        optimizer that unscales inside its step."""
        if self.device.type not in ("cpu", "cuda"):
            return False
        trainer = self._trainer
        plugin = trainer.precision_plugin if trainer is not None else None
        return getattr(plugin, "scaler", None) is None

    def on_train_start(self) -> None:
        """Set each learning rate from the schedule at the restored step. A resumed run whose budget
        (``trainer.max_steps``, hence the decay length) changed would otherwise take its first step at
        the learning rate the old schedule left in the optimizer state."""
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            lambdas = getattr(sched, "lr_lambdas", None)
            if lambdas is None:
                continue
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, lambdas, strict=True):
                group["lr"] = base * fn(sched.last_epoch)

    def _max_steps(self) -> int:
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None:
            return max(1, int(trainer.estimated_stepping_batches))
        return 1

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        """One micro-batch: the loss to back-propagate and the metrics as (mean, weight) pairs."""
        raise NotImplementedError

    def token_mean(self, total: torch.Tensor, n: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to back-propagate for ``total``, a sum over this micro-batch's ``n`` target tokens.

        Outside training (or without ``step_targets``) it is the plain mean ``total / n``. In
        training it is this micro-batch's share of the mean over every target token of the whole
        optimizer step (all micro-batches, all ranks), as ``transformers`` does since its 2024
        gradient-accumulation fix: Lightning divides each micro-batch's loss by the accumulation
        count and DDP averages gradients over ranks, so ``total * accumulation * world / N_step``
        gives gradients equal to one batch of the whole step's size, however its targets fall.
        """
        step_targets = batch.get("step_targets")
        if not self.training or step_targets is None:
            return total / n.clamp(min=1)
        trainer = self.trainer
        n_step = step_targets.to(total.device, torch.float32)
        if trainer.world_size > 1:
            n_step = trainer.strategy.reduce(n_step, reduce_op="sum")
        return total * (trainer.accumulate_grad_batches * trainer.world_size) / n_step.clamp(min=1)

    def combine(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics derived from the aggregated means (e.g. a total loss); by default none."""
        return means

    def _count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch, "train")
        self._train_means.add(out.metrics, tokens=self._count_tokens(batch))
        return out.loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Log the optimizer step's metrics over all its micro-batches and all ranks (one all-reduce).

        ``step_metrics`` holds them after every step (tensors, no host read). They go through
        ``self.log`` only on the steps whose metrics reach the loggers (every
        ``trainer.log_every_n_steps``, Lightning's rule) or when a progress bar shows them: each
        ``self.log`` call costs Lightning a walk over its result object (~0.2 ms on these CPUs, four
        calls a step), a few percent of a small model's step (``bench/lightning_overhead.py``).
        """
        means, tokens = self._train_means.reduce(self.trainer)
        self.tokens_seen += tokens.to(self.tokens_seen)
        metrics = {f"train/{name}": value for name, value in self.combine(means).items()}
        metrics["tokens_seen"] = self.tokens_seen.float()
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        self.step_metrics = metrics
        if not self._log_this_step():
            return
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "train/loss", on_step=True, on_epoch=False)
        # Logged metrics carry the number of optimizer steps completed, as checkpoint names and
        # messages do: this is step global_step + 1 (Lightning would log it at global_step, and a
        # validation after step N at N - 1).
        self.log("step", float(self.trainer.global_step + 1), on_step=True, on_epoch=False)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: Any = None
    ) -> None:
        """Clip by norm with the total norm that ``NonFiniteGuard`` computed for this step, when it did:
        ``torch.nn.utils.clip_grads_with_norm_`` is the second half of ``clip_grad_norm_``, so the
        gradients are the same to the bit as Lightning's clipping makes them, without the second walk
        over every gradient (~0.7 ms a step for the nanoGPT char recipe on 2 CPU cores). A callback that
        changed the gradients after the guard would make the norm stale; none of lm_lab's does. Without
        the guard, Lightning's ``clip_grad_norm_``, except for a fused optimizer under ``bf16-mixed``
        (which Lightning refuses): then the norm is computed here. Lightning's own path otherwise:
        clipping by value, loss scaling (``16-mixed``), sharded or DeepSpeed gradients."""
        norm, self.step_grad_norm = self.step_grad_norm, None
        if not gradient_clip_val or not self._plain_norm_clipping(gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if norm is None and not self._lightning_refuses_to_clip(optimizer):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if norm is None:  # no guard, and Lightning would refuse the fused optimizer: its norm, computed here
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if norm.device.type == "cpu":
            # clip_grads_with_norm_ multiplies every gradient by min(1, max / (norm + 1e-6)): by exactly
            # 1.0, a no-op, whenever the norm is within the limit. On CPU reading the norm costs nothing
            # (no device to wait for), so that walk over the gradients is skipped; same bits.
            coef = gradient_clip_val / (norm + 1e-6)
            if bool(coef >= 1.0):
                return
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def _plain_norm_clipping(self, algorithm: Any) -> bool:
        """Whether clipping is ``clip_grad_norm_`` over the optimizer's parameters as they are: by norm,
        with the plain precision plugin or autocast without a loss scaler."""
        if algorithm not in (None, "norm"):  # GradClipAlgorithmType is a str enum
            return False
        plugin = self.trainer.precision_plugin
        if type(plugin) is Precision:
            return True
        return type(plugin) is MixedPrecision and plugin.scaler is None

    def _lightning_refuses_to_clip(self, optimizer: Any) -> bool:
        """Lightning refuses to clip for an optimizer that unscales inside its step (fused AdamW) under
        any autocast, scaler or not; without a scaler (``bf16-mixed``, the only autocast that gets past
        ``_plain_norm_clipping``) the gradients are final and clipping them is right."""
        return isinstance(self.trainer.precision_plugin, MixedPrecision) and getattr(
            optimizer, "_step_supports_amp_scaling", False
        )

    def _log_this_step(self) -> bool:
        """Whether Lightning will hand this step's metrics to the loggers (its ``should_update_logs``:
        step ``global_step + 1`` a multiple of ``log_every_n_steps``), or a progress bar shows them."""
        trainer = self.trainer
        if trainer.progress_bar_callback is not None:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (trainer.global_step + 1) % every == 0

    # ------------------------------------------------------------------ evaluation (validation and test)
    def eval_metrics(self) -> dict[str, Any]:
        """The task's own torchmetrics (accuracy, F1, ...), fed ``StepOutput.predictions``; a fresh
        set is made for each evaluation. Token-weighted means (losses) need nothing here."""
        return {}

    def _eval_start(self) -> None:
        self._val_means = {}
        self._eval_torchmetrics = {k: m.to(self.device) for k, m in self.eval_metrics().items()}

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        self._eval_update(self._step(batch, stage))

    def _eval_update(self, out: StepOutput) -> None:
        for name, (mean, weight) in out.metrics.items():
            if name not in self._val_means:
                # torchmetrics' weighted mean, in float64: every item (token, masked token, pair)
                # of every rank weighs the same; synced over ranks when computed.
                self._val_means[name] = MeanMetric(nan_strategy="error").set_dtype(torch.float64).to(self.device)
            self._val_means[name].update(mean.detach().double(), weight.detach().double())
        if out.predictions is not None and self._eval_torchmetrics:
            preds, target = out.predictions
            if target.numel():
                for metric in self._eval_torchmetrics.values():
                    metric.update(preds.detach(), target.detach())

    def _eval_end(self, prefix: str) -> None:
        # Sums and counts over every sample of every rank, divided once: each validation sample
        # (each token, for token metrics) weighs the same whatever the batch and the world size.
        means = {name: metric.compute().float() for name, metric in sorted(self._val_means.items())}
        self._val_means = {}
        values = self.combine(means)
        if self.ppl_source in values:
            values["ppl"] = torch.exp(values[self.ppl_source].clamp(max=50.0))
        for name, metric in self._eval_torchmetrics.items():
            if metric.update_count:
                values[name] = torch.as_tensor(metric.compute(), dtype=torch.float32, device=self.device)
        self._eval_torchmetrics = {}
        for name, value in values.items():
            # Already the global value on every rank: no further sync.
            self.log(f"{prefix}/{name}", value, prog_bar=name == "loss", sync_dist=False)
        if prefix == "val":
            self.log("step", float(self.trainer.global_step), sync_dist=False)  # the weights' step (see above)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    ppl_source = "loss"  # val/ppl = exp(this aggregated metric)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)
