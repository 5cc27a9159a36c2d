"""Train a language model: ``python train.py [group=option ...] [key=value ...]``.

``train(cfg)`` is the whole recipe and the only place Hydra's ``instantiate`` is called; the
``main`` wrapper adds Hydra's command line, turns user errors into one-line messages, and returns
the optimized metric for sweepers.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from lm_lab.training.sweeps import register_resolvers  # noqa: E402

log = logging.getLogger("lm_lab")
register_resolvers()  # ${sweep_name:} in conf/hydra/default.yaml


def _build(node: Any, section: str, **kwargs: Any) -> Any:
    """``instantiate`` with errors that name the config key instead of a Hydra traceback."""
    from hydra.errors import InstantiationException

    from lm_lab.schema import ConfigError

    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            key = str(cause).split("'")[1] if "'" in str(cause) else "?"
            raise ConfigError(f"unknown config key {section}.{key}: check the spelling (see conf/{section}/)") from None
        raise ConfigError(f"bad {section} config: {cause or e}") from None


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything from ``cfg``, train, and return (metrics, objects).

    The run directory is locked throughout: a second process training into it at the same time is
    refused (``RunDirInUseError``) instead of interleaving its logs and checkpoints with this one's.
    The W&B runs it starts are finished before it returns or raises: a sweep runs its jobs in one
    process, and a run left open would be reused by the next job.
    """
    from lm_lab.training.compilation import torch_flags_kept
    from lm_lab.training.loggers import finish_loggers
    from lm_lab.training.rundir import is_launching_process, run_dir_lock
    from lm_lab.training.status import end_attempt

    output_dir = Path(cfg.paths.output_dir)
    started: list[Any] = []  # the loggers, once made
    with run_dir_lock(output_dir), torch_flags_kept():
        try:
            result = _train(cfg, output_dir, started)
        except BaseException as e:
            finish_loggers(started, failed=True)
            if is_launching_process():  # status.json: see lm_lab/training/status.py
                stopped = isinstance(e, KeyboardInterrupt)
                end_attempt(output_dir, "interrupted" if stopped else "failed", f"{type(e).__name__}: {e}")
            raise
        finish_loggers(started, failed=False)
        if is_launching_process():
            end_attempt(output_dir, "interrupted" if result[1].get("preempted") else "finished")
        return result


def _train(cfg: DictConfig, output_dir: Path, started: list[Any]) -> tuple[dict[str, float], dict[str, Any]]:
    import dataclasses
    import functools
    import json

    from lm_lab.data.hub import check_hub_sources
    from lm_lab.schema import ConfigError

    # 0. A dataset or tokenizer that needs the (unreachable) Hub: one line now, before torch,
    # Lightning and the loggers start.
    data_cfg = _build(cfg.data, "data")
    check_hub_sources(data_cfg, tokenizer=not (cfg.get("ckpt_path") or cfg.get("init_from")))

    from lm_lab.training.loggers import import_wandb, uses_wandb

    if uses_wandb([OmegaConf.to_container(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]):
        import_wandb()  # before Lightning, where it costs less (see import_wandb)

    import lightning as L
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lm_lab import registry
    from lm_lab.callbacks.data_position import DataPosition
    from lm_lab.callbacks.resume_agreement import SameResumePoint
    from lm_lab.callbacks.validation import FinalValidation
    from lm_lab.data.tokenizer import save_hf
    from lm_lab.errors import CheckpointError
    from lm_lab.scaling import PLAN_NAME
    from lm_lab.training.checkpoints import (
        check_init_from,
        check_resume,
        remove_partial_checkpoints,
        resolve_ckpt_path,
        tokenizer_from_checkpoint,
    )
    from lm_lab.training.compilation import compile_network
    from lm_lab.training.console import on_terminal, tidy_console
    from lm_lab.training.loggers import guard_loggers
    from lm_lab.training.plan import planned_on_gpu, planned_world_size
    from lm_lab.training.precision import check_precision, resolve_precision, set_matmul_precision
    from lm_lab.training.pretrained import load_into, read_source
    from lm_lab.training.rundir import write_hydra_record
    from lm_lab.training.sharding import checkpoint_activations, is_sharded_checkpoint
    from lm_lab.training.status import start_attempt
    from lm_lab.training.sweeps import active_trial, clear_finished, write_finished

    # 1. Typed configs: wrong keys, types and ranges fail here, before anything heavy. The network
    # (model=) and the objective (objective=, by default the network's) are looked up in the registry.
    tidy_console()
    model_cfg = _build(cfg.model, "model")
    # init_from (not when resuming): the network, its sizes and the tokenizer come with the weights.
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    # A resumed run names the same init_from: its network and sizes, not its weights (the checkpoint has them).
    source = read_source(cfg.init_from) if cfg.get("init_from") else None
    preset_network = registry.network_of(model_cfg).name
    if source is not None:
        model_cfg = _model_from_source(model_cfg, source)
    objective_node = cfg.get("objective")
    if source is not None and source.network.name != preset_network and not _on_command_line("objective"):
        objective_node = None  # the preset's objective belonged to the preset's network, not the source's
    objective_cfg = (
        _build(objective_node, "objective")
        if objective_node and objective_node.get("_target_")
        else registry.default_objective_config(model_cfg)
    )
    _, objective = registry.check_combination(
        model_cfg, objective_cfg, _choice("model") if source is None else f"from init_from={source.path}"
    )
    optim_cfg = _build(cfg.optimizer, "optimizer")
    sched_cfg = _build(cfg.scheduler, "scheduler")
    if data_cfg.block_size > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.block_size={data_cfg.block_size} is larger than model.max_seq_len="
            f"{model_cfg.max_seq_len}: lower data.block_size or raise model.max_seq_len"
        )
    _check_budget(cfg.trainer)
    _check_seed(cfg.get("seed"))
    _check_samples(cfg.get("sample_prompt"), cfg.get("sample_tokens", 0))
    allow_data_change = cfg.get("allow_data_change", False)
    if not isinstance(allow_data_change, bool):
        raise ConfigError(f"allow_data_change={allow_data_change!r} must be true or false")
    # data.batch_size is global: the micro-batch and accumulation follow from the number of processes.
    world = planned_world_size(cfg.trainer)
    micro, accum = data_cfg.micro_batch(world)
    # Built once, by the resume check below (which needs its corpus) or in step 3.
    make_dm = functools.cache(lambda: objective.datamodule_class()(data_cfg, objective_cfg, seed=cfg.seed))
    strategy = cfg.trainer.get("strategy")
    sharded = OmegaConf.is_dict(strategy) and str(strategy.get("_target_", "")).endswith(
        ("ShardedStrategy", "ModelParallelStrategy")
    )
    # An IsoFLOP run (experiment=scaling_*): scaling.size sets the network's shape, scaling.budget the
    # step count and schedule (lm_lab/scaling.py); N counts the embeddings, so the vocabulary comes first.
    plan = None
    if cfg.get("scaling"):
        from lm_lab.scaling import plan_run

        scaling_cfg = _build(cfg.scaling, "scaling")  # a bad scaling.size fails before the tokenizer is made
        if model_cfg.vocab_size is None:
            if ckpt_path is not None:
                tok = tokenizer_from_checkpoint(ckpt_path)
            else:
                make_dm().connect(network_kind=registry.network_of(model_cfg).kind)
                tok = make_dm().tokenizer
            model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.get_vocab_size())
        plan = plan_run(scaling_cfg, model_cfg, sched_cfg, data_cfg.batch_size * data_cfg.block_size)
        model_cfg, sched_cfg = plan.model_cfg, plan.scheduler
    max_steps = plan.max_steps if plan else cfg.trainer.get("max_steps")
    _check_warmup(sched_cfg, max_steps)
    precision = resolve_precision(cfg.trainer.get("precision"), on_gpu=planned_on_gpu(cfg.trainer))
    if ckpt_path is not None:  # before anything is written: a refused resume leaves the run untouched
        if is_sharded_checkpoint(ckpt_path) and not sharded:
            raise CheckpointError(
                f"ckpt_path={ckpt_path} is a sharded checkpoint (trainer=fsdp): resume it with trainer=fsdp, "
                f"or start a run on this strategy from its weights with init_from={ckpt_path}"
            )
        check_resume(
            ckpt_path,
            model_cfg,
            objective_cfg,
            data_cfg,
            cfg.seed,
            optim_cfg,
            sched_cfg,
            corpus_fingerprint=lambda: make_dm().corpus.fingerprint,  # loads the corpus (not its tokens)
            allow_data_change=allow_data_change,
            precision=precision,
        )
    # Weights only, fresh optimizer/schedule/data position (e.g. BERT's phase 2); a resume wins over it.
    if source is not None and ckpt_path is None and source.objective == objective_cfg.objective:
        check_init_from(source.path, data_cfg)  # the same recipe continued: its tokenizer settings must agree

    L.seed_everything(cfg.seed, workers=True)

    # 2. Trainer, callbacks, loggers.
    callbacks = [_build(c, "callbacks") for c in cfg.get("callbacks", {}).values() if c is not None]
    callbacks.append(DataPosition())  # the data position and per-step seeding: exact resume needs it
    trial = active_trial()  # this job's Optuna trial, in an lm_lab Optuna sweep
    if trial is not None and cfg.get("optimized_metric"):
        from lm_lab.callbacks.pruning import TrialPruning

        callbacks.append(TrialPruning(trial, monitor=cfg.optimized_metric))
    callbacks.append(SameResumePoint(ckpt_path))  # nodes that do not share the run directory disagree here
    # Lightning's bar on a terminal only (trainer.enable_progress_bar: null); elsewhere it prints
    # nothing readable, and callbacks.progress prints plain lines instead.
    show_bar = cfg.trainer.get("enable_progress_bar")
    show_bar = on_terminal() if show_bar is None else bool(show_bar)
    if not show_bar:  # Lightning refuses a progress-bar callback together with enable_progress_bar=False
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not on_terminal():  # datasets' tqdm bars (tokenizing) are a line of carriage returns there
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        else:  # read when datasets is imported: a run on a cached corpus may never import it
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    final_validation = (
        FinalValidation(limit_batches=cfg.get("final_val_batches")) if cfg.get("final_validation", True) else None
    )
    if final_validation is not None:
        callbacks.append(final_validation)
    loggers = guard_loggers([_build(lg, "logger") for lg in cfg.get("logger", {}).values() if lg is not None])
    started.extend(loggers)
    if not loggers:  # LearningRateMonitor refuses to run without a logger (the task logs `lr` itself anyway)
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    # trainer.val_check_interval counts optimizer steps, as max_steps does (Lightning counts
    # micro-batches): validation then falls on step boundaries on any number of devices.
    interval = plan.val_check_interval if plan else cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        interval *= accum
    check_precision(precision, on_gpu=planned_on_gpu(cfg.trainer), sharded=sharded)
    # Checkpoints are written to a temporary file and renamed: a kill never leaves half a last.ckpt.
    trainer: L.Trainer = _build(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        plugins=trainer_plugins(cfg.trainer),
        enable_progress_bar=show_bar,
        accumulate_grad_batches=accum,
        val_check_interval=interval,
        precision=precision,
        **({"max_steps": max_steps} if plan else {}),
    )
    on_cuda = type(trainer.accelerator).__name__ == "CUDAAccelerator"
    set_matmul_precision(cfg.get("matmul_precision", "high"), on_cuda=on_cuda)
    if trainer.world_size != world:
        raise ConfigError(
            f"the Trainer runs {trainer.world_size} processes but trainer.num_nodes x trainer.devices "
            f"planned {world}: set trainer.devices and trainer.num_nodes explicitly"
        )

    # 3. Data and tokenizer (a resumed run keeps the tokenizer stored in its checkpoint).
    dm = make_dm()
    stored = tokenizer_from_checkpoint(ckpt_path) if ckpt_path else source.tokenizer if source else None
    dm.connect(
        tokenizer=stored, micro_batch_size=micro, accumulate=accum, network_kind=registry.network_of(model_cfg).kind
    )
    tokenizer = dm.tokenizer
    objective_cfg = dm.complete_settings(objective_cfg)  # e.g. the label set of a classifier
    n_vocab = tokenizer.get_vocab_size()
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=n_vocab)
    elif model_cfg.vocab_size < n_vocab:
        raise ConfigError(
            f"the tokenizer has {n_vocab} tokens but model.vocab_size={model_cfg.vocab_size}: "
            f"use model.vocab_size=null (take it from the tokenizer) or a matching tokenizer"
        )

    # 4. The recipe.
    task = objective.task_class()(
        model_cfg, objective_cfg, optimizer=optim_cfg, scheduler=sched_cfg, tokenizer=tokenizer
    )
    if source is not None and ckpt_path is None:
        load_into(task, source)
    if cfg.get("activation_checkpointing"):
        checkpoint_activations(task.net, (registry.network_of(model_cfg).block_class(),))
    if cfg.get("compile"):
        compile_network(task.net, on_cpu=type(trainer.accelerator).__name__ == "CPUAccelerator")
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_hydra_record(cfg, output_dir)  # only now: a refused launch leaves an existing run's record alone
        clear_finished(output_dir)  # a run resumed or extended in its directory is not finished until it ends
        start_attempt(output_dir, resumed_from=ckpt_path)
        if plan is not None:
            (output_dir / PLAN_NAME).write_text(json.dumps(plan.record(), indent=1) + "\n", encoding="utf-8")
        remove_partial_checkpoints(output_dir / "checkpoints")
        save_hf(tokenizer, output_dir / "tokenizer")
        resolved = _plain(cfg)
        if plan is not None:  # the config's model shape and trainer.max_steps are the plan's inputs, not its outcome
            resolved["scaling_plan"] = plan.record()
        for lg in trainer.loggers:
            lg.log_hyperparams(resolved)
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):  # W&B only when it is used
            from lm_lab.training.lineage import log_lineage

            log_lineage(trainer.loggers, output_dir / "tokenizer", data_cfg, dm)
        flops = getattr(task, "flops_per_token", None)
        log.info(
            "model: %s (%s) trained with %s, %s parameters%s; batch %d x %d tokens (micro-batch %d, accumulation %d, %d device(s))",
            type(task.net).__name__,
            task.network,
            objective.name,
            f"{task.num_params():,}",
            f", {flops / 1e6:,.1f} MFLOPs per token (training)" if flops else "",
            data_cfg.batch_size,
            data_cfg.block_size,
            micro,
            accum,
            trainer.world_size,
        )

    try:
        trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SIGTERMException:
        # Preempted: Lightning stopped at the step boundary after SIGTERM and RunCheckpoint saved last.ckpt.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        requeued = getattr(trainer.checkpoint_callback, "requeued", None)
        if trainer.is_global_zero and requeued:
            print(f"stopped for SLURM requeue after step {trainer.global_step}; requeued job {requeued}")
        elif trainer.is_global_zero:
            print(
                f"stopped by SIGTERM after step {trainer.global_step}; resume with the same command plus "
                f"ckpt_path=last hydra.run.dir={output_dir}"
            )
        return metrics, {"trainer": trainer, "task": task, "datamodule": dm, "cfg": cfg, "preempted": True}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    if final_validation is not None and final_validation.needs_validation(trainer):
        # Fit ended without validating its final weights (an epoch budget; max_steps runs validate
        # them inside fit, see FinalValidation), or final_val_batches asks for a wider validation
        # of them than the in-training ones: the reported and returned metrics are these.
        final_validation.widen(trainer)
        for results in trainer.validate(task, datamodule=dm, verbose=False):
            metrics.update({k: float(v) for k, v in results.items()})
    if dm.has_test():
        # The test split, once, with the best checkpoint by the monitored validation metric.
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        for results in trainer.test(task, datamodule=dm, ckpt_path=best or None, verbose=False):
            metrics.update({k: float(v) for k, v in results.items()})
    metrics.pop("step", None)  # the logged step number (see LMTask.on_before_optimizer_step)
    if trainer.is_global_zero:
        pruned = any(getattr(c, "pruned", False) for c in trainer.callbacks)
        write_finished(output_dir, metrics, step=trainer.global_step, pruned=pruned)
        _report(cfg, task, trainer, metrics, output_dir)
    return metrics, {"trainer": trainer, "task": task, "datamodule": dm, "cfg": cfg}


def trainer_plugins(trainer_cfg: Any) -> list[Any]:
    """The preset's ``trainer.plugins`` (``cluster=slurm``: Lightning's ``SLURMEnvironment`` with
    auto-requeue) and lm_lab's atomic checkpoint writes (a kill never leaves half a last.ckpt)."""
    from lm_lab.training.checkpoints import AtomicCheckpointIO

    return [*(_build(p, "trainer") for p in trainer_cfg.get("plugins") or []), AtomicCheckpointIO()]


def _check_budget(trainer_cfg: Any) -> None:
    """A run must end: positive ``max_steps``, or ``max_steps=-1`` with a positive ``max_epochs``."""
    from lm_lab.schema import ConfigError

    steps, epochs = trainer_cfg.get("max_steps"), trainer_cfg.get("max_epochs")
    if steps is not None and steps != -1 and steps <= 0:
        raise ConfigError(f"trainer.max_steps={steps} must be > 0 (or -1 to train for trainer.max_epochs epochs)")
    if steps in (None, -1) and (epochs is None or epochs <= 0):
        raise ConfigError(
            f"trainer.max_steps={steps} and trainer.max_epochs={epochs}: the run would never stop; "
            "set trainer.max_steps=<optimizer steps> (or trainer.max_epochs=<epochs>)"
        )


def _check_seed(seed: Any) -> None:
    """The range NumPy's seeding (and ``seed_everything``) accepts."""
    from lm_lab.schema import ConfigError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise ConfigError(f"seed={seed!r} must be an integer from 0 to {2**32 - 1}")


def _check_samples(prompt: Any, tokens: Any) -> None:
    """``sample_prompt``: text, or null for no samples; ``sample_tokens``: an integer >= 0 (0: no sample
    at the end). Checked before training: a bad value would otherwise fail the run at its end."""
    from lm_lab.schema import ConfigError

    if prompt is not None and not isinstance(prompt, str):
        raise ConfigError(
            f"sample_prompt={prompt!r} must be text (quote it: 'sample_prompt=\"{prompt}\"') or null for no samples"
        )
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ConfigError(f"sample_tokens={tokens!r} must be an integer >= 0 (0: no sample at the end of the run)")


def _check_warmup(sched_cfg: Any, max_steps: int | None) -> None:
    """Warn (one line) when warm-up takes more than half of the run. It is not rescaled: the
    schedule stays what the config says, as in a longer run with the same settings."""
    warmup = sched_cfg.warmup_steps
    if not max_steps or max_steps <= 0 or warmup <= max_steps / 2:
        return
    what = (
        "the run ends before the learning rate reaches optimizer.lr"
        if warmup >= max_steps
        else f"the learning rate peaks only after {warmup / max_steps:.0%} of the run"
    )
    log.warning(
        "scheduler.warmup_steps=%d with trainer.max_steps=%d: %s; for a short run set e.g. scheduler.warmup_steps=%d",
        warmup,
        max_steps,
        what,
        max(1, max_steps // 10),
    )


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers (without Hydra's own node)."""
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }


def _report(cfg: DictConfig, task: Any, trainer: Any, metrics: dict[str, float], output_dir: Path) -> None:
    if hasattr(task, "generate") and cfg.get("sample_tokens", 0) > 0 and cfg.get("sample_prompt") is not None:
        text = task.generate(cfg.sample_prompt, cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
        print(f"\n--- sample ({cfg.sample_tokens} tokens) ---\n{cfg.sample_prompt}{text}\n---")
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
    print(f"final metrics: {shown}")
    ckpt_cb = getattr(trainer, "checkpoint_callback", None)
    last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb is not None and ckpt_cb.dirpath else None
    print(f"run directory: {output_dir}")
    if last is not None and last.exists():
        ckpt = shlex.quote(str(last))
        if callable(getattr(task, "fill_mask", None)):
            use = f"{_command('fill-mask')} {ckpt} 'The [MASK] is here.'"
        elif callable(getattr(task, "generate", None)):
            use = f"{_command('generate')} {ckpt} --prompt 'Hello'"
        else:
            use = ""
        export = f"{_command('export')} {ckpt} {shlex.quote(str(output_dir / 'hf'))}"
        print(f"checkpoint:    {last}" + (f"\n  use it:  {use}" if use else "") + f"\n  export:  {export}")


def _command(tool: str) -> str:
    """How to run an lm_lab tool from this shell, as it can be pasted: the console script beside
    this interpreter (the venv's bin/, which `make train` never activates), else this interpreter
    with ``-m``; relative to the current directory when inside it."""
    script = Path(sys.executable).parent / f"lm-lab-{tool}"
    path = script if script.is_file() else Path(sys.executable)
    try:
        shown = str(path.relative_to(Path.cwd()))
        shown = shown if "/" in shown else f"./{shown}"
    except ValueError:
        shown = str(path)
    shown = shlex.quote(shown)
    return shown if script.is_file() else f"{shown} -m lm_lab.{tool.replace('-', '_')}"


def _model_from_source(composed: Any, source: Any) -> Any:
    """The model config of an ``init_from`` run: the source's network and sizes; settings that may
    change on resume (dropout, init) from the composed ``model`` when it is the same network."""
    import dataclasses

    from lm_lab.schema import resume_fields

    if type(composed) is not type(source.model_cfg):
        log.info(
            "init_from=%s: the network is %s (from the source, not the model preset)", source.path, source.network.name
        )
        return source.model_cfg
    free = {f.name for f in dataclasses.fields(composed)} - set(resume_fields(composed))
    return dataclasses.replace(source.model_cfg, **{k: getattr(composed, k) for k in free})


def _on_command_line(group: str) -> bool:
    """Whether ``group=...`` (or ``group.key=...``) was given as an override (command line or compose)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return False
    return any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == group for o in overrides)


def _choice(group: str) -> str | None:
    """The option chosen for a config group (``model=gpt_tiny`` -> ``gpt_tiny``), when Hydra knows it."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # no Hydra context (train(cfg) called with a hand-made config)
        return None


# Keys that moved, and where to: a command line using the old name gets one line naming the new one.
MOVED_KEYS = {
    **{
        f"data.{k}": f"objective.{k}"
        for k in (
            "pair_objective",
            "mlm_probability",
            "max_predictions",
            "whole_word_masking",
            "max_ngram",
            "short_seq_prob",
            "dupe_factor",
        )
    },
    "model.family": "objective (the network follows model=; the objective is objective=causal_lm|masked_lm)",
}


def moved_key_error(args: list[str]) -> str | None:
    """The message for the first command-line override that uses a moved key, else None."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in MOVED_KEYS:
            new = MOVED_KEYS[key]
            value = arg.split("=", 1)[1] if "=" in arg else "..."
            shown = f"{new}={value}" if new.startswith("objective.") else new
            return (
                f"{key} has moved: use {shown} (with a BERT model or objective=masked_lm)"
                if new.startswith("objective.")
                else f"{key} is gone: {new}"
            )
    return None


def _launch_rank() -> int:
    """This process's global rank as its launcher (Lightning, torchrun, SLURM) set it; 0 alone."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _join_launched_job() -> None:
    """A process that torchrun or srun started: the job must name one run directory, and ranks
    other than 0 log to ``train_rank<R>.log`` (see ``lm_lab.training.launch``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lm_lab.training.launch import check_run_dir_given, external_launch, log_to_rank_file

    hydra_cfg = HydraConfig.get()
    rank, world = external_launch()
    check_run_dir_given(list(hydra_cfg.overrides.hydra), world, multirun=hydra_cfg.mode == RunMode.MULTIRUN)
    if rank > 0:
        log_to_rank_file(rank)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from lm_lab.errors import USER_ERRORS
    from lm_lab.training.rundir import RunDirInUseError, is_fresh
    from lm_lab.training.sweeps import job_number, mark_pruned, plan_job

    output_dir = Path(cfg.paths.output_dir)
    # Only a directory this launch created may be removed on failure: hydra.run.dir may name an existing
    # run (or any directory) whose contents are not ours.
    fresh = is_fresh(output_dir)
    try:
        _join_launched_job()
        if job_number() is not None:  # a multirun job: its directory is stable, so it may hold a run already
            plan = plan_job(output_dir, cfg.get("optimized_metric"))
            if plan.skip:
                if plan.pruned:
                    mark_pruned()
                print(f"job {job_number()}: finished before ({output_dir}), skipped")
                return plan.value
            if plan.resume and not cfg.get("ckpt_path"):
                with open_dict(cfg):
                    cfg.ckpt_path = "last"
        metrics, objects = train(cfg)
    except (*USER_ERRORS, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ENOSPC:
            raise
        message = str(e)
        if isinstance(e, OSError):  # a full disk anywhere else (logs, tokenizer, ...)
            message = (
                f"disk full while writing {e.filename or 'a file'}: free space there, or point hydra.run.dir "
                "(checkpoints, logs) or paths.cache_dir (tokenized data) at a disk with room"
            )
        if not isinstance(e, RunDirInUseError):  # another live run's train.log: not a byte of it changes
            log.error("%s", message)
        if _launch_rank() == 0:  # every DDP process hits the same error: one line for the job
            print(f"error: {message}", file=sys.stderr)
        if isinstance(e, RunDirInUseError):
            sys.exit(2)
        if fresh and not (output_dir / "checkpoints").exists():
            # Nothing was trained: leave no half-written run directory behind.
            logging.shutdown()
            shutil.rmtree(output_dir, ignore_errors=True)
        sys.exit(2)
    if objects.get("preempted") and job_number() is not None:
        # The sweep stops here, its trial unfinished; the same command resumes it (and the sweep).
        print("sweep stopped by SIGTERM: rerun the same command to continue it")
        logging.shutdown()
        sys.exit(0)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return value


if __name__ == "__main__":
    moved = moved_key_error(sys.argv[1:])
    if moved:
        print(f"error: {moved}", file=sys.stderr)
        sys.exit(2)
    from lm_lab.training.console import run_command

    def _process() -> None:
        main()  # Hydra's main returns the swept metric (for sweepers), not an exit code

    run_command(_process)
