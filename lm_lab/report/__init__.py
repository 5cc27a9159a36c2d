"""Results at a glance: ``python -m lm_lab.report DIR`` (``lm-lab-report``) on a run, a multirun or a
whole ``logs/`` folder -- a table and PNG plots; ``--scaling`` fits the scaling laws of an IsoFLOP study."""


class ReportError(ValueError):
    """Nothing to report on (or to fit): the message names the problem and the fix."""
