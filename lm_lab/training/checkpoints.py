"""Reading checkpoints safely: ``torch.load(weights_only=True)`` only, clear errors; writing them
atomically (``AtomicCheckpointIO``); choosing and vetting the checkpoint a run resumes from."""

from __future__ import annotations

import dataclasses
import errno
import importlib
import logging
import os
import pickle
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from lm_lab.errors import CheckpointError  # defined there: importable without torch
from lm_lab.schema import ConfigError, resume_fields, tokenizer_fields
from lm_lab.training.sharding import is_sharded_checkpoint

log = logging.getLogger("lm_lab")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents (tensors memory-mapped), refusing arbitrary pickles, files that
    are not lm_lab checkpoints, damaged weights (checksum) and non-finite weights.

    Every reader goes through here: resume (also Lightning's own load, see ``AtomicCheckpointIO``),
    ``init_from``, export, generate and fill_mask.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _read_sharded_checkpoint(path)
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
    st = path.stat()
    identity = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # PyTorch's own message advises weights_only=False, i.e. running whatever code the file holds.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} is not an lm_lab checkpoint: it contains Python objects{what} beyond tensors and plain "
            "containers, which lm_lab never unpickles (they can run code): pass a checkpoint written by train.py"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "use an earlier checkpoint"
        ) from e
    _check_layout(ckpt, path)
    if identity not in _VERIFIED:  # hashing is the costly part; a run reads its checkpoint several times
        verify_weights(ckpt, path)
        _VERIFIED.add(identity)
    return ckpt


def _read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint (a directory written by ``trainer=fsdp``, ``training.sharding``): every
    file checked against its CRC-32, ``meta.pt`` loaded with ``weights_only=True``, the weights
    consolidated on CPU, then the same layout and finiteness checks as a single file."""
    from lm_lab.training.sharding import CHECKSUM_FILE, read_sharded, verify_checksums

    sums = path / CHECKSUM_FILE
    st = sums.stat() if sums.is_file() else (path / "meta.pt").stat()
    identity = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if identity not in _VERIFIED:
        if not sums.is_file():
            log.info("sharded checkpoint %s has no %s (not written by lm_lab): files not verified", path, CHECKSUM_FILE)
        else:
            bad = verify_checksums(path)
            if bad is not None:
                raise CheckpointError(
                    f"checkpoint {path} is damaged: its file {bad} is missing or does not match the checksum "
                    "written with it: use an earlier checkpoint"
                )
    try:
        ckpt = read_sharded(path)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not an lm_lab checkpoint: its meta.pt contains Python objects beyond tensors and plain "
            "containers, which lm_lab never unpickles: pass a checkpoint written by train.py"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"sharded checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "use an earlier checkpoint"
        ) from e
    _check_layout(ckpt, path)
    if identity not in _VERIFIED:
        verify_weights(ckpt, path, files_checked=sums.is_file())
        _VERIFIED.add(identity)
    return ckpt


def _check_layout(ckpt: Any, path: Path) -> None:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("state_dict"), dict)
        or not isinstance(hp, dict)
        or not isinstance(hp.get("network", hp.get("family")), str)
        or not isinstance(hp.get("model"), dict)
    ):
        raise CheckpointError(
            f"{path} is not an lm_lab checkpoint (it needs a state_dict and hyper_parameters naming the "
            "network and its settings): pass a checkpoint written by train.py"
        )


CHECKSUM_KEY = "lm_lab_checksum"
# (path, device, inode, size, mtime) of files whose weights were verified by this process.
_VERIFIED: set[tuple[Any, ...]] = set()


def weights_checksum(state_dict: dict[str, Any]) -> dict[str, int]:
    """CRC-32 of each tensor's bytes (seeded with its dtype and shape), by key.

    ``torch.load`` does not check the zip's own CRCs, so a flipped bit inside a tensor loads without
    complaint. CRC-32 (zlib) runs at several GB/s; a cryptographic hash would be 3-5x slower and
    protects against nothing more here (the threat is a damaged disk or copy, not an attacker).
    """
    sums = {}
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        sums[key] = zlib.crc32(data, zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode()))
    return sums


def verify_weights(ckpt: dict[str, Any], path: Path, files_checked: bool = False) -> None:
    """Refuse weights that differ from the checksum stored with them, or that are not finite.
    ``files_checked``: a sharded checkpoint whose files were checked against their own CRC-32s."""
    state = ckpt["state_dict"]
    stored = (ckpt.get(CHECKSUM_KEY) or {}).get("crc32")
    if files_checked:
        pass
    elif stored is None:
        log.info("checkpoint %s has no weights checksum (written before lm_lab stored one): not verified", path)
    else:
        now = weights_checksum(state)
        bad = next((k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)), None)
        if bad is not None:
            raise CheckpointError(
                f"checkpoint {path} is damaged: tensor {bad} does not match the checksum written with it "
                "(changed on disk or in a copy): use an earlier checkpoint"
            )
    for key in sorted(state):
        t = state[key]
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not _finite(t):
            raise CheckpointError(
                f"checkpoint {path} holds non-finite weights (NaN/inf in {key}): the run that wrote it "
                "diverged; use an earlier checkpoint (and a lower optimizer.lr)"
            )


def _finite(t: torch.Tensor) -> bool:
    # A sum is one fast pass and is NaN/inf when any element is; only then (or on overflow) look closer.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


NONFINITE_PREFIX = "nonfinite-"  # written when a run stops on non-finite losses; never resumed by "last"
BEST_LINK = "best.ckpt"  # a link to (or copy of) one of the step files: never a resume candidate of its own


def find_checkpoints(output_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first: ``checkpoints/*.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_*.ckpt`` (written on SIGUSR1 before a requeue); last.ckpt wins a tie."""
    found = [
        p
        for p in (output_dir / "checkpoints").glob("*.ckpt")
        if not p.name.startswith(NONFINITE_PREFIX) and p.name != BEST_LINK
    ]
    found += list(output_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(
        (p for p in found if p.is_file() or is_sharded_checkpoint(p)),
        key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"),
        reverse=True,
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
    if path.is_dir() and not is_sharded_checkpoint(path):
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
        if others and (path.is_file() or is_sharded_checkpoint(path)):
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

    Each checkpoint carries a checksum of its weights (``weights_checksum``), checked by every reader
    (``read_checkpoint``), including the load of a resume, which goes through ``load_checkpoint`` here.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = {**checkpoint, CHECKSUM_KEY: {"crc32": weights_checksum(checkpoint["state_dict"])}}
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

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded_checkpoint(Path(str(path))):
            # Only ShardedStrategy loads the shards into a sharded model (it never calls this).
            raise CheckpointError(
                f"{path} is a sharded checkpoint (trainer=fsdp): resume it with trainer=fsdp, or start a "
                f"run on this strategy from its weights with init_from={path}"
            )
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # The file a resume restores is the one that was vetted: weights_only, checksum, finite weights.
        return read_checkpoint(path)


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
    for tmp in [*directory.glob(".*.ckpt.tmp-*"), *directory.glob(".*.ckpt.old-*")]:
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing a partial checkpoint left by a killed run: %s", tmp)
            if tmp.is_dir() and not tmp.is_symlink():  # a sharded checkpoint's directory
                shutil.rmtree(tmp, ignore_errors=True)
            else:
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


def _diff(saved: dict[str, Any], now: dict[str, Any], keys: Any, section: str) -> list[str]:
    """``section.key=now (checkpoint: saved)`` for each key set in both that differs. A current value of
    None or "auto" is decided later from the data (e.g. a classifier's labels) and not compared here."""

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return [
        f"{section}.{k}={norm(now[k])!r} (checkpoint: {norm(saved[k])!r})"
        for k in keys
        if k in saved and k in now and now[k] not in (None, "auto") and norm(saved[k]) != norm(now[k])
    ]


def data_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a DataModule stored in the checkpoint (``TextDataModule.state_dict``), or {}."""
    for key, value in ckpt.items():
        if key.endswith("DataModule") and isinstance(value, dict):
            return value
    return {}


def network_of_checkpoint(hp: dict[str, Any]) -> Any:
    """The registry entry of the network a checkpoint holds. A network registered outside lm_lab is
    registered by importing the module of its config class, which the checkpoint names."""
    from lm_lab import registry

    name = hp.get("network") or hp.get("family")  # "family": checkpoints written before the registry
    if name not in registry.NETWORKS and isinstance(hp.get("model_class"), str):
        module = hp["model_class"].partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CheckpointError(
                f"the checkpoint's network {name!r} is defined in {module}, which cannot be imported ({e}): "
                "run from where that module is importable"
            ) from None
    try:
        return registry.network(name)
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint holds an {e}") from None


def configs_of_checkpoint(ckpt: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(network entry, model config, objective settings) a checkpoint was trained with."""
    from lm_lab import registry

    hp = ckpt["hyper_parameters"]
    net = network_of_checkpoint(hp)
    values = {k: v for k, v in hp["model"].items() if k != "family"}  # "family": before the registry
    model_cfg = net.config_class().from_dict(values)
    obj = registry.objective(hp.get("objective") or net.objective)
    settings = hp.get("objective_settings")
    if settings is None:  # before the registry, BERT's masking settings were data settings
        saved_data = data_state(ckpt).get("data") or {}
        names = {f.name for f in dataclasses.fields(obj.config_class())}
        settings = {k: v for k, v in saved_data.items() if k in names}
    return net, model_cfg, obj.config_class().from_dict(settings)


def check_resume(
    path: Path,
    model_cfg: Any,
    objective_cfg: Any,
    data_cfg: Any,
    seed: int,
    optim_cfg: Any = None,
    sched_cfg: Any = None,
    corpus_fingerprint: Callable[[], str | None] | None = None,
    allow_data_change: bool = False,
    precision: object = None,
) -> None:
    """Refuse (one line) a resume whose network, objective, model or data stream differs from the checkpoint's.

    The settings compared are every field of the model, objective and data config dataclasses
    except those marked ``RESUME_FREE`` (``lm_lab.schema``). ``corpus_fingerprint`` returns the
    current corpus's ``Corpus.fingerprint`` (called last, as it loads the corpus): a checkpoint
    records the one it was trained on, so a corpus edited in place (same settings, even the same
    number of blocks) is refused too, unless ``allow_data_change``.

    Warned, not refused: other optimizer or scheduler values, and a ``precision`` (the resolved
    ``trainer.precision``) other than the one the checkpoint was trained in. ``trainer.precision=auto``
    resolves per machine, so the same resume command on other hardware would otherwise change the
    run's arithmetic without a word; checkpoints written before lm_lab recorded it are not checked.
    """
    from lm_lab import registry

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    net, _, saved_objective = configs_of_checkpoint(ckpt)
    now_net = registry.network_of(model_cfg)
    if net.name != now_net.name:
        raise CheckpointError(
            f"ckpt_path={path} is a {net.name} checkpoint but model is {now_net.name}: "
            "pick the model preset it was trained with"
        )
    if saved_objective.objective != objective_cfg.objective:
        raise CheckpointError(
            f"ckpt_path={path} was trained with objective={saved_objective.objective}, this run has "
            f"objective={objective_cfg.objective}: resume with objective={saved_objective.objective}, or start "
            f"a new run from its weights with init_from={path}"
        )
    changed = _diff(hp["model"], dataclasses.asdict(model_cfg), resume_fields(model_cfg), "model")
    if changed:
        raise CheckpointError(
            f"ckpt_path={path} was trained with other model settings: {', '.join(changed)}: "
            "resume with the checkpoint's model settings, or start a new run (ckpt_path=null)"
        )
    dstate = data_state(ckpt)
    changed = _diff(
        dataclasses.asdict(saved_objective),
        dataclasses.asdict(objective_cfg),
        resume_fields(objective_cfg),
        "objective",
    )
    saved_data = dstate.get("data")
    if saved_data:
        changed += _diff(saved_data, dataclasses.asdict(data_cfg), resume_fields(data_cfg), "data")
    if "seed" in dstate and dstate["seed"] != seed:
        changed.append(f"seed={seed} (checkpoint: {dstate['seed']})")
    if changed:
        raise CheckpointError(
            f"resuming {path} with a different data stream: {', '.join(changed)}: resume with "
            f"the checkpoint's values, or start a new run from its weights with init_from={path}"
        )
    saved_corpus = dstate.get("corpus")
    current = corpus_fingerprint() if saved_corpus and corpus_fingerprint is not None else None
    if current and saved_corpus != current:
        if not allow_data_change:
            raise CheckpointError(
                f"resuming {path} on different data: the corpus changed since the checkpoint was written "
                f"(fingerprint {current}, checkpoint: {saved_corpus}; e.g. a data file edited in place): "
                f"resume with the data it was trained on, start a new run with init_from={path}, or pass "
                "allow_data_change=true to continue on the changed data"
            )
        log.warning(
            "resuming %s on a changed corpus (fingerprint %s, checkpoint: %s): allow_data_change=true, "
            "the data position is kept but the samples behind it differ",
            path,
            current,
            saved_corpus,
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
    saved_precision = ckpt.get("precision")
    if precision is not None and saved_precision is not None and str(saved_precision) != str(precision):
        log.warning(
            "resuming %s in trainer.precision=%s; it was trained in %s (auto picks per machine): the run "
            "goes on, but not as it would have in %s; set trainer.precision=%s to keep its arithmetic",
            path,
            precision,
            saved_precision,
            saved_precision,
            saved_precision,
        )


def check_init_from(path: Path, data_cfg: Any) -> None:
    """A model keeps its tokenizer: refuse ``init_from`` with explicitly different tokenizer settings."""
    saved = data_state(read_checkpoint(path)).get("data")
    if not saved:
        return
    now = dataclasses.asdict(data_cfg)
    keys = tokenizer_fields(data_cfg)
    if now.get("tokenizer") == "auto":
        keys = [k for k in keys if k != "tokenizer"]
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
    """Load a trained lm_lab checkpoint: the objective's LightningModule in eval mode, tokenizer at ``.tokenizer``.

    Which module comes back is decided by the registry from the checkpoint's network and objective:
    a decoder trained with ``causal_lm`` is called on token ids (B, T) and returns logits (B, T, V);
    BERT trained with ``masked_lm`` takes ``input_ids, token_type_ids, attention_mask`` and returns
    ``.mlm_logits`` and ``.nsp_logits``.
    """
    from lm_lab import registry
    from lm_lab.training.optim import OptimizerConfig, SchedulerConfig

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    _, model_cfg, objective_cfg = configs_of_checkpoint(ckpt)
    task_cls = registry.objective_of(objective_cfg).task_class()
    tok = Tokenizer.from_str(ckpt["tokenizer_json"]) if ckpt.get("tokenizer_json") else None
    task = task_cls(
        model_cfg,
        objective_cfg,
        optimizer=OptimizerConfig(**hp.get("optimizer", {})),
        scheduler=SchedulerConfig(**hp.get("scheduler", {})),
        tokenizer=tok,
    )
    task.load_state_dict(_plain_state(ckpt), strict=True)
    return task.to(map_location).eval()


def _plain_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("._orig_mod", ""): v for k, v in ckpt["state_dict"].items()}


def init_weights_from(task: Any, path: str | Path) -> None:
    """Copy the weights of ``path`` (an lm_lab checkpoint or a Hugging Face directory) into ``task``;
    nothing else is restored (``lm_lab.training.pretrained.load_into``)."""
    from lm_lab.training.pretrained import load_into, read_source

    source = read_source(path)
    if source.network.name != task.network:
        raise CheckpointError(
            f"init_from={path} is a {source.network.name} checkpoint but model is {task.network}: "
            "pick a checkpoint of the same network"
        )
    load_into(task, source)


def load_task(source: str | Path, *, able_to: str, hint: str) -> Any:
    """The task (eval mode) of a ``.ckpt`` or an exported Hugging Face directory, refusing one that
    cannot ``able_to`` (a method name: ``generate``, ``fill_mask``); ``hint`` says what to use instead."""
    path = Path(source)
    task = load_export_dir(path) if path.is_dir() and not is_sharded_checkpoint(path) else load_checkpoint(path)
    if not callable(getattr(task, able_to, None)):
        raise CheckpointError(
            f"{path} holds a {task.network} model trained with objective={task.objective_spec.name}, "
            f"which cannot {able_to.replace('_', '-')}: {hint}"
        )
    return task


def load_export_dir(path: Path) -> Any:
    """The task (eval mode) of a directory written by ``lm_lab.export``: the network is chosen by the
    ``model_type`` of its config.json through the registry, the objective by its ``architectures``
    (a ``...ForSequenceClassification`` is a classifier; the network's own class, its default objective)."""
    import json

    from safetensors.torch import load_file

    from lm_lab import registry

    cfg_file, weights, tok_file = path / "config.json", path / "model.safetensors", path / "tokenizer.json"
    for f in (cfg_file, weights, tok_file):
        if not f.is_file():
            raise CheckpointError(f"{path} is not an exported model directory (missing {f.name})")
    hf = json.loads(cfg_file.read_text())
    try:
        net = registry.network_for_hf(str(hf.get("model_type")))
        mapping = net.hf_module()
        model_cfg = mapping.config_from_hf(hf)
    except (ConfigError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    objective = registry.objective_for_hf(str((hf.get("architectures") or [""])[0]), net)
    task_cls = objective.task_class()
    settings = task_cls.settings_from_hf(hf)
    task = task_cls(model_cfg, settings, tokenizer=Tokenizer.from_file(str(tok_file)))
    task.load_hf_weights(load_file(str(weights)))
    return task.eval()
