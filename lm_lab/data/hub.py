"""Is the Hugging Face Hub reachable? Answer fast, so offline machines fail in a second.

Without this, ``datasets`` retries for about 25 s before saying the hub is unreachable.
:func:`check_hub_sources` runs before ``train()`` imports torch, Lightning or ``datasets`` or
starts a logger: an offline Hub preset is one line, at once.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from typing import Any

# What `datasets.load_dataset` reads from local files (its packaged builders), and lm_lab's own corpus.
LOCAL_BUILDERS = frozenset({"text", "json", "csv", "parquet", "arrow", "pydocs"})
TRAINED_TOKENIZERS = frozenset({"auto", "bpe", "char", "wordpiece"})
LOCAL_DATA_FIX = "data=files data.data_files=/path/to/*.txt"  # as the README says


@functools.cache
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    ok = bool(result and result[0])
    if not ok:
        go_offline()
    return ok


def go_offline() -> None:
    """Put ``datasets``/``huggingface_hub`` in offline mode so cached data still loads."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def hub_offline_message(what: str, fix: str) -> str:
    return (
        f"the Hugging Face Hub is unreachable (offline), so {what} cannot be downloaded: "
        f"use local files instead ({fix}), or download it on a machine with network and copy the cache"
    )


def dataset_on_hub(path: str | None, data_files: Any) -> bool:
    """Does ``data.path`` (with ``data.data_files``) name a dataset to download from the Hub?"""
    if data_files or path in (None, "", "auto") or path in LOCAL_BUILDERS:
        return False
    return not Path(path).expanduser().exists()


def tokenizer_on_hub(source: str) -> bool:
    """Does ``data.tokenizer`` name a tokenizer to download from the Hub?"""
    if source in TRAINED_TOKENIZERS or source.startswith((".", "/", "~")) or source.endswith(".json"):
        return False
    return not Path(source).expanduser().exists()


def check_hub_sources(data_cfg: Any, tokenizer: bool = True) -> None:
    """Raise the one-line offline error now if the run needs the Hub and it is unreachable.
    ``tokenizer=False``: the tokenizer comes from a checkpoint (resume, ``init_from``)."""
    from lm_lab.errors import DataError, TokenizerError

    on_hub = dataset_on_hub(data_cfg.path, data_cfg.data_files)
    tok_on_hub = tokenizer and tokenizer_on_hub(str(data_cfg.tokenizer))
    if not (on_hub or tok_on_hub) or hub_reachable():
        return
    if on_hub:
        raise DataError(hub_offline_message(f"dataset {data_cfg.path!r}", LOCAL_DATA_FIX))
    raise TokenizerError(
        hub_offline_message(f"tokenizer {data_cfg.tokenizer!r}", "data.tokenizer=<local tokenizer directory>")
    )
