"""What a run prints: each message once on the console, everything in ``train.log``.

Hydra's job logging (``conf/hydra/default.yaml``) sends every record to two handlers: the console
(through :class:`ConsoleFilter` and :class:`ConsoleFormatter`) and ``train.log`` (all of it, with
timestamps). :func:`tidy_console` removes the second console copy that Lightning's own handler
would print and routes Python warnings through the same two handlers.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

# Messages kept out of the console (train.log still has them): repeated on every run and never
# something a researcher acts on.
NOISE: tuple[str, ...] = (
    "💡 Tip:",  # Lightning advertising its cloud products
    "isinstance(treespec, LeafSpec)",  # a torch deprecation inside Lightning's own code
    "exists and is not empty",  # ModelCheckpoint, on every resume into the run's own directory
)


class ConsoleFilter(logging.Filter):
    """Drops, on the console only, the :data:`NOISE` messages, records logged with
    ``extra={"console": False}`` (e.g. progress lines while a progress bar is shown), and lm_lab's
    errors, which ``train.py``'s ``main`` prints itself as one ``error: ...`` line on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if record.name == "lm_lab" and record.levelno >= logging.ERROR:
            return False
        message = record.getMessage()
        return not any(n in message for n in NOISE)


class ConsoleFormatter(logging.Formatter):
    """The bare message for INFO; ``warning: ...`` / ``error: ...`` above it (the timestamps and
    logger names are in train.log)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def tidy_console() -> None:
    """Call after ``import lightning`` once logging is configured (by Hydra).

    The ``lightning`` package adds a stderr handler to its logger at import and lets records
    propagate to the root as well, so under Hydra's job logging every Lightning message was printed
    twice (``INFO: ...`` and timestamped). With a configured root logger that handler goes; without
    one (``train(cfg)`` in a notebook) it stays, as the only copy.
    """
    root = logging.getLogger()
    if not root.handlers:
        return
    # lightning.pytorch / lightning.fabric add their own handler (and stop propagating) when
    # imported before logging was configured.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    # Warnings (Lightning's advice, deprecations) into train.log too, and once on the console.
    logging.captureWarnings(True)


def on_terminal() -> bool:
    """Is the console a terminal (not a pipe, a file, nohup or a batch system)?"""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stdout
        return False


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """A command's whole process (``train.py``, the ``lm-lab-*`` console scripts): ``sys.exit(main())``
    with the garbage collector frozen first.

    Python's shutdown runs full collections over every object torch, Lightning and datasets made:
    1.2-2.4 s after the last line a command prints, on 2 CPU cores (``docs/benchmarks.md``). Frozen
    objects are skipped by those collections and still freed by reference counting; atexit handlers
    (W&B's, logging's) run as before. Only for a process that ends here: a frozen cycle is never
    collected, so never inside ``train()`` (a Hydra multirun calls it once per job in one process) or
    a command's ``main(argv)`` that tests call in-process.
    """
    try:
        code = main()
    finally:
        gc.freeze()
    sys.exit(code)
