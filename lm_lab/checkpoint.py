"""Reading checkpoints safely: ``torch.load(weights_only=True)`` only, clear errors."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

log = logging.getLogger("lm_lab")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or not an lm_lab checkpoint."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents (tensors memory-mapped), refusing arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}: check ckpt_path (use ckpt_path=last to resume "
                              "the newest checkpoint of this run directory)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a torch zip archive): "
                              "use an earlier checkpoint from the same checkpoints/ directory")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
                              "use an earlier checkpoint") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not an lm_lab checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def resolve_ckpt_path(value: str | None, output_dir: Path) -> Path | None:
    """``None`` -> no resume; ``"last"`` -> newest checkpoint in ``output_dir`` or None; else a path."""
    if value in (None, "", "null"):
        return None
    if value == "last":
        ckpt_dir = output_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        candidates = [last] if last.is_file() else sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            log.info("ckpt_path=last: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        path = candidates[-1]
        log.info("ckpt_path=last: resuming from %s", path)
    else:
        path = Path(value).expanduser()
    read_checkpoint(path)  # validates before anything heavy starts
    return path


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
    task = task_cls(model_cfg, optimizer=OptimizerConfig(**hp["optimizer"]),
                    scheduler=SchedulerConfig(**hp["scheduler"]), tokenizer=tok)
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
        raise CheckpointError(f"init_from={path} is a {family} checkpoint but model is {task.family}: "
                              "pick a checkpoint of the same model family")
    state = {k.replace("._orig_mod", ""): v for k, v in ckpt["state_dict"].items()}
    try:
        task.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"init_from={path} does not fit this model ({first}): use the model.* sizes "
                              "of the run that wrote it") from e
    log.info("initialised weights from %s (%s tokens seen before)", path, f"{int(task.tokens_seen):,}")


def _model_config(family: str, values: dict[str, Any]) -> Any:
    if family == "gpt":
        from lm_lab.models.gpt import GPTConfig

        return GPTConfig.from_dict(values)
    from lm_lab.models.bert import BertConfig

    return BertConfig.from_dict(values)
