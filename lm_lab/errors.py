"""The exceptions that mean "the user asked for something that cannot work" (not a bug).

``train.py`` prints these as one line and exits with status 2.
"""

from __future__ import annotations

from lm_lab.callbacks.nonfinite import NonFiniteLossError
from lm_lab.checkpoint import CheckpointError
from lm_lab.config import ConfigError
from lm_lab.data.sources import DataError
from lm_lab.data.tokenizer import TokenizerError
from lm_lab.rundir import RunDirInUseError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    TokenizerError,
    CheckpointError,
    NonFiniteLossError,
    RunDirInUseError,
)
