"""Logger factories used by ``conf/logger``: W&B that never fails a run for lack of a login."""

from __future__ import annotations

import csv
import functools
import logging
import os
import shlex
from pathlib import Path
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


RUN_ID_FILE = "run_id"  # <save_dir>/wandb/run_id: the W&B run a resumed run continues
MAX_TAG = 64  # W&B's limit on a tag's length
MAX_NAME = 256


def wandb_logger(mode: str = "auto", **kwargs: Any) -> Any:
    """A Lightning ``WandbLogger``. ``mode``: ``auto`` (online when logged in, else offline),
    ``online``, ``offline`` or ``disabled``. ``WANDB_MODE`` in the environment wins.

    The run is named and tagged from the command's overrides, joins its sweep's group in a multirun,
    and keeps one W&B run id per run directory (``wandb/run_id``), so a resumed run continues its W&B
    run. The mode goes to ``wandb.init`` itself: Lightning's ``offline=True`` refuses ``log_model``,
    but wandb queues checkpoint artifacts in an offline run and ``wandb sync`` uploads them.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(mode)
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
        if mode == "offline":
            log.info("W&B: not logged in, logging offline (the command to sync the run is printed at the end)")
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs["mode"] = mode
    overrides = _job_overrides()
    kwargs.update(_sweep_identity(kwargs.get("name"), kwargs.get("group")))
    if overrides:
        kwargs["name"] = f"{kwargs.get('name') or 'run'} {','.join(_short(o) for o in overrides)}"[:MAX_NAME]
        kwargs["tags"] = list(dict.fromkeys([*(kwargs.get("tags") or []), *(o[:MAX_TAG] for o in overrides)]))
    if mode != "disabled" and not kwargs.get("id"):
        kwargs["id"] = _run_id(kwargs.get("save_dir"))
    logger = WandbLogger(**kwargs)
    # Lightning always passes anonymous=None, which wandb 0.31 answers with "WARNING The anonymous
    # setting has no effect" on every run.
    logger._wandb_init.pop("anonymous", None)
    return logger


def wandb_mode(mode: str | None) -> str:
    """The W&B mode a run gets: ``WANDB_MODE`` in the environment wins over the config's (default auto)."""
    return os.environ.get("WANDB_MODE") or mode or "auto"


def import_wandb() -> None:
    """Import W&B now, before torch and Lightning, for a run that will log to it (``train()`` calls this
    before its first ``import lightning``).

    Every ``wandb.init`` imports W&B's Launch package to look for staged Launch inputs, and that
    package builds pydantic models that read their fields' docstrings through ``inspect``, which walks
    all of ``sys.modules`` for each class. With torch, Lightning and transformers loaded (several
    thousand modules) that import took 0.5-0.6 s at the run's start; before them, 0.14 s. A run with
    the default loggers (W&B offline + CSV) reaches its end of step 1 ~0.7 s sooner (``docs/benchmarks.md``,
    sixth round). The same modules are imported either way.
    """
    try:
        import wandb  # noqa: F401
        import wandb.sdk.launch.inputs.internal  # noqa: F401  (what wandb.init imports)
    except ImportError:  # no W&B (the logger says so when made), or a W&B whose Launch package moved
        pass


def uses_wandb(logger_cfgs: list[dict[str, Any]]) -> bool:
    """Whether a run's logger settings (``cfg.logger``'s entries, as plain dicts) log to W&B."""
    return any(
        str(lg.get("_target_", "")).endswith(("wandb_logger", "WandbLogger"))
        and wandb_mode(lg.get("mode")) != "disabled"
        for lg in logger_cfgs
    )


def _job_overrides() -> list[str]:
    """The command's overrides (a sweep job's own), without the logger's (``logger=``, ``logger.*``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [str(o) for o in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):
        return []
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] != "logger"]


def _short(override: str) -> str:
    """``data.data_files=/a/b/input.txt`` -> ``data.data_files=input.txt``: a name, not a path."""
    key, sep, value = override.partition("=")
    return f"{key}{sep}{os.path.basename(value.rstrip('/'))}" if "/" in value else override


def _run_id(save_dir: str | None) -> str | None:
    """The W&B run id of this run directory: read from ``<save_dir>/wandb/run_id``, or made and stored
    there (by the launching process only). None when it cannot be stored: W&B then picks one."""
    from lm_lab.training.rundir import is_launching_process

    path = Path(save_dir or ".") / "wandb" / RUN_ID_FILE
    try:
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            log.info("W&B: continuing run %s (%s)", stored, path)
            return stored
    except OSError:
        pass
    if not is_launching_process():
        return None
    import secrets
    import string

    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n", encoding="utf-8")
    except OSError as e:
        log.info("W&B: cannot store the run id in %s (%s): a resumed run would start a new W&B run", path, e)
        return None
    return run_id


def _sweep_identity(name: str | None, group: str | None) -> dict[str, str]:
    """In a Hydra multirun (grid or Optuna), each job is its own W&B run named ``<name>-<job
    number>``, grouped by the sweep (``<name>-<sweep directory name>``) unless a group is set."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return {}
        base = name or "run"
        out = {"name": f"{base}-{hc.job.num}"}
        if not group:
            out["group"] = f"{base}-{os.path.basename(os.path.normpath(hc.sweep.dir))}"
        return out
    except (ImportError, ValueError, AttributeError):  # not under Hydra (train(cfg) from Python)
        return {}


def finish_loggers(loggers: list[Any], failed: bool) -> None:
    """End the W&B runs this job started (exit code 1 when it failed).

    A Hydra multirun or Optuna sweep runs every job in one process; a W&B run left open there is
    picked up by the next job's ``WandbLogger`` ("There is a wandb run already in progress"), so all
    jobs logged into job 0's run. Never raises: a logger problem must not hide the job's own result.
    """
    for lg in loggers:
        experiment = getattr(lg, "_experiment", None)  # only where this process started one (rank 0)
        if type(lg).__name__ != "WandbLogger" or experiment is None or not hasattr(experiment, "finish"):
            continue
        offline = _offline_dir(experiment)
        try:
            experiment.finish(exit_code=1 if failed else 0)
        except Exception as e:
            log.warning("W&B: finishing the run failed (%s: %s)", type(e).__name__, e)
            continue
        if offline is not None:
            print(f"W&B run logged offline; to upload it:  wandb sync {shlex.quote(str(offline))}")


def _offline_dir(run: Any) -> Path | None:
    """The offline run's folder (``.../wandb/offline-run-<time>-<id>``), or None when online."""
    try:
        if not run.settings._offline:
            return None
        return Path(run.dir).parent  # run.dir is its files/ folder
    except Exception:
        return None


# ---------------------------------------------------------------------- CSV that survives a resume


def csv_logger(save_dir: str, name: str = "", version: str | int | None = "", **kwargs: Any) -> Any:
    """A Lightning ``CSVLogger`` that *appends* to an existing ``metrics.csv``, and never loses it.

    Lightning's deletes the file when its folder is not empty, so a run resumed into its own
    directory would lose the interrupted attempt's rows. Steps logged after the resumed
    checkpoint appear twice (the resumed attempt logs them again): keep the last row per step.

    Lightning rewrites the whole file in place (truncate, then write) whenever a new column appears,
    e.g. at the first validation. A run killed during that rewrite left an empty file, and its
    resumed attempt started a new one: every earlier row was gone. Here the rewrite goes to a file
    beside it that is renamed into place, and a last row cut short by a kill is dropped on resume.
    """
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            path = self.metrics_file_path
            if os.path.isfile(path + _REWRITE):
                os.remove(path + _REWRITE)  # a rewrite cut short by a kill; the file itself is whole
            if os.path.isfile(path) and os.path.getsize(path) > 0:
                _drop_partial_last_line(path)
                with open(path, newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])  # the existing header, in its order
                log.info("CSV logger: appending to %s", path)

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            path = self.metrics_file_path
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            tmp = path + _REWRITE
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=save_dir, name=name, version=version, **kwargs)


_REWRITE = ".tmp"  # metrics.csv.tmp: a header rewrite in progress, renamed into place when whole


def _drop_partial_last_line(path: str) -> None:
    """Cut a last line that does not end in a newline (a kill in the middle of an append): appended
    to, it would merge with the next row into one wrong row."""
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        if last == b"\n":
            return
        if last == b"\r":  # cut between the csv module's "\r\n": the row itself is whole
            f.write(b"\n")
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1  # 0 when even the header is cut: the file starts again
        log.warning("CSV logger: %s ended in a partial row (an interrupted write); dropping it", path)
        f.truncate(keep)


# ---------------------------------------------------------------------- loggers must not stop training

_GUARDED = ("log_metrics", "log_hyperparams", "log_graph", "save", "finalize", "after_save_checkpoint")


def guard_loggers(loggers: list[Any]) -> list[Any]:
    """Start each logger now and drop, with a warning, those that cannot start (W&B without a
    login in online mode, an unwritable save_dir, ...); afterwards a failing logger call is a
    warning (once per logger and method), never a failed run."""
    kept = []
    for lg in loggers:
        name = type(lg).__name__
        try:
            _ = lg.experiment  # creates the W&B run / TensorBoard writer / CSV folder
        except Exception as e:
            log.warning(
                "logger %s could not start (%s: %s): training goes on without it",
                name,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            continue
        for method in _GUARDED:
            if hasattr(lg, method):
                setattr(lg, method, _guarded(getattr(lg, method), name, method))
        kept.append(lg)
    return kept


def _guarded(fn: Any, name: str, method: str) -> Any:
    warned = False

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal warned
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not warned:
                log.warning(
                    "logger %s failed in %s (%s: %s): training goes on; further failures of this call are not reported",
                    name,
                    method,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                warned = True
            return None

    return call
