"""The exceptions that mean "the user asked for something that cannot work" (not a bug).

``train.py`` prints these as one line and exits with status 2. They are defined here, in a module
that imports neither torch nor Lightning nor ``datasets`` (their modules re-export them), so that
``train.py`` can catch them without paying for those imports first: a bad config or an offline
Hub preset fails in about a second.
"""

from __future__ import annotations

from lm_lab.schema import ConfigError


class DataError(ValueError):
    """The corpus cannot be used; the message names the file or key and the fix."""


class TokenizerError(ValueError):
    """The tokenizer cannot be used; the message says why and what to do."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or not an lm_lab checkpoint."""


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses for ``patience`` optimizer steps in a row."""


from lm_lab.training.rundir import RunDirInUseError  # noqa: E402  (defined with the lock it reports)

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    TokenizerError,
    CheckpointError,
    NonFiniteLossError,
    RunDirInUseError,
)
