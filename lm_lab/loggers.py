"""Logger factories used by ``conf/logger``: W&B that never fails a run for lack of a login."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("lm_lab")


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        hosts = netrc.netrc().hosts
        return any("wandb" in h for h in hosts)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(mode: str = "auto", **kwargs: Any) -> Any:
    """A Lightning ``WandbLogger``. ``mode``: ``auto`` (online when logged in, else offline),
    ``online``, ``offline`` or ``disabled``. ``WANDB_MODE`` in the environment wins."""
    from lightning.pytorch.loggers import WandbLogger

    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        mode = env_mode
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
        if mode == "offline":
            log.info("W&B: not logged in, logging offline (sync later with `wandb sync %s`)",
                     os.path.join(kwargs.get("save_dir", "."), "wandb"))
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "disabled":
        kwargs["mode"] = "disabled"
    return WandbLogger(offline=mode == "offline", **kwargs)
