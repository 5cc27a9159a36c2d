"""A run's lineage in W&B: the tokenizer and a fingerprint of its data, as artifacts the run *uses*.

Artifacts are content-addressed: two runs on the same data and tokenizer log the same files, so W&B
finds the same artifact version (the same digest) and links both runs to it. Offline, ``use_artifact``
refuses to run (wandb 0.31: "Cannot use artifact when in offline mode"); the record it would write for
a new artifact — the artifact, marked ``use_after_commit`` — is written instead through the run's
``_log_artifact``, so ``wandb sync`` links the run to it as an input as an online run would have.
Every failure here is a warning: lineage never stops training.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("lm_lab")


def data_fingerprint(data_cfg: Any, dm: Any) -> dict[str, Any]:
    """What identifies the training data: dataset (path, name, split), each local file by name and
    content hash (xxh3-128), the corpus fingerprint lm_lab caches and resumes on, and the name of the
    tokenized cache entry (a hash of corpus, tokenizer and data settings). No absolute path and no
    time: the same data gives the same record on any run."""
    from lm_lab.data import cache
    from lm_lab.data.sources import resolve_files

    files = []
    if getattr(data_cfg, "data_files", None):
        files = [{"name": p.name, "xxh3_128": cache.file_digest(p)} for p in resolve_files(data_cfg.data_files)]
    entry = dm.data_cache() if hasattr(dm, "data_cache") else None
    return {
        "dataset": {"path": data_cfg.path, "name": getattr(data_cfg, "name", None), "split": data_cfg.split},
        "files": files,
        "corpus_fingerprint": getattr(dm.corpus, "fingerprint", None),
        "tokenized_cache": entry.name if entry is not None else None,
        "block_size": data_cfg.block_size,
    }


def log_lineage(loggers: list[Any], tokenizer_dir: Path, data_cfg: Any, dm: Any) -> None:
    """Record the tokenizer and the data fingerprint as artifacts used by each W&B run in ``loggers``."""
    fingerprint = None
    for lg in loggers:
        run = getattr(lg, "_experiment", None)
        if type(lg).__name__ != "WandbLogger" or run is None or not hasattr(run, "log_artifact"):
            continue
        try:
            fingerprint = fingerprint or data_fingerprint(data_cfg, dm)
            _use_lineage(run, tokenizer_dir, fingerprint)
        except Exception as e:
            log.warning(
                "W&B: recording the tokenizer and data artifacts failed (%s: %s): training goes on",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )


def _use_lineage(run: Any, tokenizer_dir: Path, fingerprint: dict[str, Any]) -> None:
    import wandb

    dataset, files = fingerprint["dataset"], fingerprint["files"]
    if files:  # local files: named after the first (data.path is only their format)
        label = files[0]["name"] + (f"+{len(files) - 1}" if len(files) > 1 else "")
    else:
        label = "-".join(str(v) for v in (dataset["path"], dataset["name"]) if v)
    label = _artifact_name(label)
    data = wandb.Artifact(f"data-{label}", type="dataset", metadata=fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "fingerprint.json"
        record.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        data.add_file(str(record), name="fingerprint.json", policy="mutable")  # copied: tmp goes away
        tok = wandb.Artifact(f"tokenizer-{label}", type="tokenizer")
        for f in sorted(tokenizer_dir.iterdir()):
            if f.is_file():
                tok.add_file(str(f), name=f.name, policy="mutable")
        for artifact in (tok, data):
            _use(run, artifact)
    log.info(
        "W&B: the run uses artifacts %s (digest %s) and %s (digest %s)", tok.name, tok.digest, data.name, data.digest
    )


def _use(run: Any, artifact: Any) -> None:
    if getattr(run.settings, "_offline", False):
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, ``-``, ``_`` and ``.``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:100] or "data"
