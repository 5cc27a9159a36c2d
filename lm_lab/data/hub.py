"""Is the Hugging Face Hub reachable? Answer fast, so offline machines fail in a second.

Without this, ``datasets`` retries for about 25 s before saying the hub is unreachable.
"""

from __future__ import annotations

import functools
import os
import socket
import threading


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
