"""Starting a run from pretrained weights (``init_from=``): an lm_lab checkpoint or a Hugging Face
model directory (``save_pretrained`` / ``lm_lab.export`` output: config.json, model.safetensors or
pytorch_model.bin, tokenizer.json).

The source's network, sizes and tokenizer are used (the network and its sizes come with the
weights); its weights go into the new task by name. A pretraining run continued from its own
objective's checkpoint (BERT's phase 2) must match key for key; a task with a new head (e.g.
``objective=classification``) may miss only that head's weights, and leaves the source's
pretraining heads (``cls.*``, ``lm_head.weight``) unused. Both lists are logged; anything else is
refused with one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lm_lab.errors import CheckpointError
from lm_lab.schema import ConfigError

log = logging.getLogger("lm_lab")


@dataclasses.dataclass
class WeightsSource:
    """What ``init_from`` points at, read once."""

    path: Path
    network: Any  # registry.NetworkSpec
    model_cfg: Any
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]  # our names, relative to the network's ``lm`` module (or HF task class)
    objective: str | None  # the objective an lm_lab checkpoint was trained with; None for an HF directory
    tokens_seen: int = 0


def read_source(path: str | Path) -> WeightsSource:
    """Read an lm_lab ``.ckpt`` or a Hugging Face model directory (one-line errors)."""
    path = Path(path).expanduser()
    from lm_lab.training.sharding import is_sharded_checkpoint

    if path.is_dir() and not is_sharded_checkpoint(path):
        return _read_hf_dir(path)
    from lm_lab.training.checkpoints import configs_of_checkpoint, read_checkpoint

    ckpt = read_checkpoint(path)
    net, model_cfg, objective_cfg = configs_of_checkpoint(ckpt)
    tok_json = ckpt.get("tokenizer_json")
    if not tok_json:
        raise CheckpointError(f"init_from={path} holds no tokenizer: it was not written by lm_lab")
    state = ckpt["state_dict"]
    weights = {k[len("net.") :].replace("._orig_mod", ""): v for k, v in state.items() if k.startswith("net.")}
    tokens = int(state["tokens_seen"]) if "tokens_seen" in state else 0
    return WeightsSource(path, net, model_cfg, Tokenizer.from_str(tok_json), weights, objective_cfg.objective, tokens)


def _read_hf_dir(path: Path) -> WeightsSource:
    from lm_lab import registry

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"init_from={path} is a directory without config.json: pass an lm_lab .ckpt or a Hugging Face model directory"
        )
    hf = json.loads(cfg_file.read_text())
    try:
        net = registry.network_for_hf(str(hf.get("model_type")))
        mapping = net.hf_module()
        model_cfg = mapping.config_from_hf(hf)
    except (ConfigError, ValueError, KeyError) as e:
        raise CheckpointError(f"init_from={path}: {e}") from None
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(
            f"init_from={path} has no tokenizer.json (the fast tokenizer lm_lab reads): save the tokenizer "
            "with transformers' save_pretrained, or export the model with python -m lm_lab.export"
        )
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"init_from={path} holds no model.safetensors or pytorch_model.bin")
    prefix = net.hf_prefix
    if prefix and not any(k.startswith(prefix + ".") for k in raw):
        raw = {f"{prefix}.{k}": v for k, v in raw.items()}  # a bare backbone (e.g. the hub's gpt2 files)
    try:
        weights = mapping.from_hf_weights(raw, model_cfg)
    except ValueError as e:
        raise CheckpointError(f"init_from={path}: {e}") from None
    return WeightsSource(path, net, model_cfg, Tokenizer.from_file(str(tok_file)), weights, None)


def load_into(task: Any, source: WeightsSource) -> None:
    """Copy ``source``'s weights into ``task.net`` by name.

    A task that trains the source's own objective must match it exactly (tied aliases aside); a task
    with a head of its own (``task.head_parameter_names()``) may miss only those, and may leave the
    source's weights outside its backbone (the pretraining heads) unused. Shapes must agree.
    """
    net = task.net
    own = net.state_dict()
    new_head = set(getattr(task, "head_parameter_names", lambda: [])())
    tied = _tied_names(net)
    missing = [
        k
        for k in own
        if k not in source.weights and k not in new_head and not (tied.get(k, set()) & source.weights.keys())
    ]
    unexpected = sorted(k for k in source.weights if k not in own)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(
            f"init_from={source.path} does not fit this model (it lacks {shown}): pass a checkpoint of the "
            f"same network ({task.network}) and sizes"
        )
    wrong = [
        f"{k} {tuple(source.weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in source.weights and source.weights[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"init_from={source.path} does not fit this model (weights of other shapes: {wrong[0]}): "
            "use the model.* sizes of the run that wrote it"
        )
    if unexpected and not new_head:
        raise CheckpointError(
            f"init_from={source.path} does not fit this model (it has no {', '.join(unexpected[:3])}): "
            "use the model.* sizes of the run that wrote it"
        )
    loaded = {k: v for k, v in source.weights.items() if k in own}
    result = net.load_state_dict(loaded, strict=False)
    fresh = sorted(k for k in result.missing_keys if not (tied.get(k, set()) & loaded.keys()))
    if hasattr(task, "tokens_seen") and not new_head:
        task.tokens_seen.fill_(source.tokens_seen)
    log.info(
        "initialised %d weights from %s%s%s",
        len(loaded),
        source.path,
        f"; new (randomly initialised): {', '.join(fresh)}" if fresh else "",
        f"; unused from the source: {', '.join(unexpected)}" if unexpected else "",
    )


def _tied_names(net: torch.nn.Module) -> dict[str, set[str]]:
    """For each state-dict key, the other keys that name the same tensor (tied weights)."""
    state = net.state_dict(keep_vars=True)
    by_tensor: dict[int, set[str]] = {}
    for name, t in state.items():
        by_tensor.setdefault(id(t), set()).add(name)
    return {name: by_tensor[id(t)] - {name} for name, t in state.items()}
