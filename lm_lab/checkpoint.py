"""Reading checkpoints safely: ``torch.load(weights_only=True)`` only, clear errors; writing them
atomically (``AtomicCheckpointIO``); choosing and vetting the checkpoint a run resumes from."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

log = logging.getLogger("lm_lab")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or not an lm_lab checkpoint."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents (tensors memory-mapped), refusing arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}: check ckpt_path (use ckpt_path=last to resume "
            "the newest checkpoint of this run directory)"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (not a torch zip archive): "
            "use an earlier checkpoint from the same checkpoints/ directory"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "use an earlier checkpoint"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not an lm_lab checkpoint (no state_dict/hyper_parameters)")
    return ckpt


NONFINITE_PREFIX = "nonfinite-"  # written when a run stops on non-finite losses; never resumed by "last"


def find_checkpoints(output_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first: ``checkpoints/*.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_*.ckpt`` (written on SIGUSR1 before a requeue); last.ckpt wins a tie."""
    found = [p for p in (output_dir / "checkpoints").glob("*.ckpt") if not p.name.startswith(NONFINITE_PREFIX)]
    found += list(output_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(
        (p for p in found if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True
    )


def resolve_ckpt_path(value: str | None, output_dir: Path) -> Path | None:
    """``None`` -> no resume; ``"last"`` -> newest readable checkpoint of ``output_dir`` or None; else a path."""
    if value in (None, "", "null"):
        return None
    if value == "last":
        candidates = find_checkpoints(output_dir)
        if not candidates:
            log.info("ckpt_path=last: no checkpoint in %s, starting fresh", output_dir / "checkpoints")
            return None
        for path in candidates:
            try:
                read_checkpoint(path)
            except CheckpointError as e:
                # A checkpoint damaged outside lm_lab (ours are written atomically): fall back to the previous one.
                log.warning("ckpt_path=last: skipping %s: %s", path, e)
                continue
            log.info("ckpt_path=last: resuming from %s", path)
            return path
        raise CheckpointError(
            f"ckpt_path=last: none of the {len(candidates)} checkpoints in {output_dir} can be "
            "read: start a new run (ckpt_path=null and another hydra.run.dir)"
        )
    path = Path(value).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"ckpt_path={path} is a directory: pass a checkpoint file, e.g. "
            f"{path / 'checkpoints' / 'last.ckpt'}, or ckpt_path=last with hydra.run.dir={path}"
        )
    try:
        read_checkpoint(path)  # validates before anything heavy starts
    except CheckpointError as e:
        others = (
            [p for p in find_checkpoints(path.parent.parent) if p.resolve() != path.resolve()]
            if path.parent.name == "checkpoints"
            else []
        )
        if others and path.is_file():
            raise CheckpointError(f"{e} (e.g. ckpt_path={others[0]})") from None
        raise
    return path


# ---------------------------------------------------------------------- atomic writes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, fsyncs it, then renames it into place.

    Readers (and a resumed run) see the old file or the new one, never half of one. Lightning's
    ``TorchCheckpointIO`` stages the file in the system temp directory and *moves* it, which is a
    copy when that directory is another file system (usual on clusters): a kill during the copy
    leaves a truncated checkpoint. A full disk is reported as one line and the previous file is kept.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        f = None
        try:
            with open(tmp, "wb") as raw:
                f = _WriteErrors(raw)
                torch.save(checkpoint, f)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            # torch.save reports a failed write as a RuntimeError of its zip writer; the OSError is kept here.
            cause = e if isinstance(e, OSError) else getattr(f, "error", None)
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                kept = "the previous version is intact" if path.exists() else "nothing was written"
                raise CheckpointError(
                    f"disk full while writing checkpoint {path} ({kept}): free space on that "
                    "disk or set paths.log_dir / hydra.run.dir to one with room"
                ) from None
            raise
        return None


class _WriteErrors:
    """A file wrapper that remembers the first ``OSError`` raised by ``write``."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_checkpoints(directory: Path) -> None:
    """Delete temporary files of checkpoint writes killed by SIGKILL (their process is gone)."""
    for tmp in directory.glob(".*.ckpt.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing a partial checkpoint left by a killed run: %s", tmp)
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- vetting a resume

# Model settings that may change on resume (everything else must match the checkpoint).
RESUME_FREE_MODEL_KEYS = ("dropout", "attn_dropout", "init_std")
# Data settings that decide which samples come in which order; a resume must keep them.
DATA_STREAM_KEYS = (
    "path",
    "name",
    "data_files",
    "text_column",
    "split",
    "val_split",
    "val_fraction",
    "sample_by",
    "streaming",
    "streaming_val_docs",
    "tokenizer",
    "vocab_size",
    "tokenizer_train_docs",
    "lowercase",
    "strip_accents",
    "block_size",
    "sampling",
    "batch_size",
    "pair_objective",
    "mlm_probability",
    "max_predictions",
    "whole_word_masking",
    "short_seq_prob",
    "dupe_factor",
)
TOKENIZER_KEYS = ("tokenizer", "vocab_size", "lowercase", "strip_accents")


def _diff(saved: dict[str, Any], now: dict[str, Any], keys: Any, section: str) -> list[str]:
    """``section.key=now (checkpoint: saved)`` for each key set in both that differs."""

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return [
        f"{section}.{k}={norm(now[k])!r} (checkpoint: {norm(saved[k])!r})"
        for k in keys
        if k in saved and k in now and now[k] is not None and norm(saved[k]) != norm(now[k])
    ]


def data_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a DataModule stored in the checkpoint (``TextDataModule.state_dict``), or {}."""
    for key, value in ckpt.items():
        if key.endswith("DataModule") and isinstance(value, dict):
            return value
    return {}


def check_resume(
    path: Path, model_cfg: Any, data_cfg: Any, seed: int, optim_cfg: Any = None, sched_cfg: Any = None
) -> None:
    """Refuse (one line) a resume whose model or data stream differs from the checkpoint's."""
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    if hp.get("family") != model_cfg.family:
        raise CheckpointError(
            f"ckpt_path={path} is a {hp.get('family')} checkpoint but model is {model_cfg.family}: "
            "pick the model preset it was trained with"
        )
    now = dataclasses.asdict(model_cfg)
    model_keys = [k for k in hp["model"] if k not in RESUME_FREE_MODEL_KEYS]
    changed = _diff(hp["model"], now, model_keys, "model")
    if changed:
        raise CheckpointError(
            f"ckpt_path={path} was trained with other model settings: {', '.join(changed)}: "
            "resume with the checkpoint's model settings, or start a new run (ckpt_path=null)"
        )
    dstate = data_state(ckpt)
    saved_data = dstate.get("data")
    if saved_data:
        changed = _diff(saved_data, dataclasses.asdict(data_cfg), DATA_STREAM_KEYS, "data")
        if "seed" in dstate and dstate["seed"] != seed:
            changed.append(f"seed={seed} (checkpoint: {dstate['seed']})")
        if changed:
            raise CheckpointError(
                f"resuming {path} with a different data stream: {', '.join(changed)}: resume with "
                f"the checkpoint's values, or start a new run from its weights with init_from={path}"
            )
    changed = [
        d
        for key, cfg in (("optimizer", optim_cfg), ("scheduler", sched_cfg))
        if cfg is not None
        for d in _diff(hp.get(key, {}), dataclasses.asdict(cfg), hp.get(key, {}).keys(), key)
    ]
    if changed:
        log.warning(
            "resuming with %s: the optimizer state (incl. its hyperparameters) is restored from the "
            "checkpoint; only the schedule's shape follows the new values",
            ", ".join(changed),
        )


def check_init_from(path: Path, data_cfg: Any) -> None:
    """A model keeps its tokenizer: refuse ``init_from`` with explicitly different tokenizer settings."""
    saved = data_state(read_checkpoint(path)).get("data")
    if not saved:
        return
    now = dataclasses.asdict(data_cfg)
    if now.get("tokenizer") in ("auto", saved.get("tokenizer")):
        keys = [k for k in TOKENIZER_KEYS if k != "tokenizer"] if now.get("tokenizer") == "auto" else TOKENIZER_KEYS
    else:
        keys = TOKENIZER_KEYS
    changed = _diff(saved, now, keys, "data")
    if changed:
        raise CheckpointError(
            f"init_from={path} has its own tokenizer, built with other settings: {', '.join(changed)}: "
            "drop these overrides (the checkpoint's tokenizer is used) or train from scratch"
        )


def tokenizer_from_checkpoint(path: str | Path) -> Tokenizer:
    ckpt = read_checkpoint(path)
    tok_json = ckpt.get("tokenizer_json")
    if not tok_json:
        raise CheckpointError(f"checkpoint {path} holds no tokenizer: it was not written by lm_lab")
    return Tokenizer.from_str(tok_json)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a trained lm_lab checkpoint: the LightningModule in eval mode, tokenizer at ``.tokenizer``.

    Calling the module on token ids (B, T) returns logits (B, T, V) for GPT; for BERT it takes
    ``input_ids, token_type_ids, attention_mask`` and returns ``.mlm_logits`` and ``.nsp_logits``.
    """
    from lm_lab.tasks import task_for

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    family = hp.get("family")
    task_cls = task_for(family)
    from lm_lab.config import OptimizerConfig, SchedulerConfig

    model_cfg = _model_config(family, hp["model"])
    tok = Tokenizer.from_str(ckpt["tokenizer_json"]) if ckpt.get("tokenizer_json") else None
    task = task_cls(
        model_cfg,
        optimizer=OptimizerConfig(**hp["optimizer"]),
        scheduler=SchedulerConfig(**hp["scheduler"]),
        tokenizer=tok,
    )
    state = {k.replace("._orig_mod", ""): v for k, v in ckpt["state_dict"].items()}
    task.load_state_dict(state, strict=True)
    return task.to(map_location).eval()


def init_weights_from(task: Any, path: str | Path) -> None:
    """Copy a checkpoint's weights (and ``tokens_seen``) into ``task``; nothing else is restored.

    For a new run that starts from trained weights (``init_from=``), e.g. BERT's phase 2 at 512
    tokens after phase 1 at 128: the optimizer, LR schedule, step count and data position start fresh.
    """
    ckpt = read_checkpoint(path)
    family = ckpt["hyper_parameters"].get("family")
    if family != task.family:
        raise CheckpointError(
            f"init_from={path} is a {family} checkpoint but model is {task.family}: "
            "pick a checkpoint of the same model family"
        )
    state = {k.replace("._orig_mod", ""): v for k, v in ckpt["state_dict"].items()}
    try:
        task.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(
            f"init_from={path} does not fit this model ({first}): use the model.* sizes of the run that wrote it"
        ) from e
    log.info("initialised weights from %s (%s tokens seen before)", path, f"{int(task.tokens_seen):,}")


def _model_config(family: str, values: dict[str, Any]) -> Any:
    if family == "gpt":
        from lm_lab.models.gpt import GPTConfig

        return GPTConfig.from_dict(values)
    from lm_lab.models.bert import BertConfig

    return BertConfig.from_dict(values)


def load_task_of_family(path: str | Path, family: str, hint: str) -> Any:
    """``load_checkpoint`` that refuses a checkpoint of another model family (``hint``: what to use)."""
    task = load_checkpoint(path)
    if task.family != family:
        raise CheckpointError(f"{path} is a {task.family} checkpoint, not {family}: {hint}")
    return task


def read_export_dir(
    path: Path, model_type: str, hint: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Tokenizer]:
    """(HF config, weights, tokenizer) of a directory written by ``lm_lab.export``, checked for ``model_type``."""
    import json

    from safetensors.torch import load_file

    cfg_file, weights, tok_file = path / "config.json", path / "model.safetensors", path / "tokenizer.json"
    for f in (cfg_file, weights, tok_file):
        if not f.is_file():
            raise CheckpointError(f"{path} is not an exported model directory (missing {f.name})")
    hf = json.loads(cfg_file.read_text())
    if hf.get("model_type") != model_type:
        raise CheckpointError(f"{path} holds a {hf.get('model_type')!r} model, not {model_type}: {hint}")
    return hf, load_file(str(weights)), Tokenizer.from_file(str(tok_file))
