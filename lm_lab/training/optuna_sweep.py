"""An Optuna search that survives interruption: ``python train.py -m hparams_search=optuna``, rerun after
a kill, continues its study instead of starting another.

Built on hydra-optuna-sweeper 1.3.0 (its search-space parsing, trial configuration and launcher), with
its ``sweep`` loop rewritten because that loop, rerun on the same storage, would

- run ``n_trials`` *more* trials (it counts from zero on every call) — here ``n_trials`` is the
  study's total: finished (complete, pruned, failed) trials count and are not run again;
- number jobs from 0 on every call, so a rerun would train trial 0's job directory again — here a
  job's number, and so its directory ``<sweep dir>/<n>``, is its trial number;
- leave a trial whose process was killed ``RUNNING`` for ever — here such a trial is run again with
  its own parameters in its own directory, where the job resumes from its last checkpoint;
- restart a seeded sampler's random stream, so the first new trial would repeat trial 0's
  parameters — here the seed is offset by the number of trials already in the study;
- have no pruner — here ``pruner`` is any ``optuna.pruners`` class (``NopPruner`` by default), fed
  by ``callbacks.pruning.TrialPruning`` through the trial lent to the job (``training.sweeps``).

The study is stored in ``<sweep dir>/optuna.db`` (SQLite) unless ``storage`` names another, under the
name ``study_name`` (default: the sweep directory's name). One sweep process per sweep directory: it
is locked while the search runs, which is what makes a ``RUNNING`` trial found at start-up a dead one.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lm_lab.training import sweeps
from lm_lab.training.rundir import run_dir_lock

log = logging.getLogger(__name__)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, pruner: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pruner = pruner

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
        sampler = self.sampler
        if isinstance(sampler, functools.partial) and sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            sampler = functools.partial(sampler, grid)
            self.n_trials = min(self.n_trials, _product(len(v) for v in grid.values()))
        for name in fixed:
            distributions.pop(name, None)
        directions = self._get_directions()

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the study's state is logged below, once
        with run_dir_lock(sweep_dir):
            storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
            study = optuna.create_study(
                study_name=self.study_name or sweep_dir.name,
                storage=storage,
                directions=directions,
                load_if_exists=True,
            )
            trials = study.get_trials(deepcopy=False)
            study.sampler = _make_sampler(sampler, offset=len(trials))
            study.pruner = self.pruner if self.pruner is not None else optuna.pruners.NopPruner()
            done = [t for t in trials if t.state.is_finished()]
            killed = [t for t in trials if t.state == TrialState.RUNNING]
            log.info(
                "Study %s in %s: %d trials finished, %d interrupted", study.study_name, storage, len(done), len(killed)
            )
            # Interrupted trials first, one at a time: their own parameters, their own directory.
            for t in killed:
                log.info("Trial %d was interrupted: running it again (it resumes from its last checkpoint)", t.number)
                trial = optuna.Trial(study, t._trial_id)
                self._launch(study, [trial], self._configure_trials([trial], distributions, fixed))
            to_go = self.n_trials - len(done) - len(killed)
            while to_go > 0:
                batch = [study.ask() for _ in range(min(to_go, self.n_jobs))]
                self._launch(study, batch, self._configure_trials(batch, distributions, fixed))
                to_go -= len(batch)
            self._save_results(study, directions, sweep_dir)

    def _launch(self, study: optuna.Study, trials: list[optuna.Trial], overrides: Any) -> None:
        numbers = [t.number for t in trials]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):  # job number = trial number
            for trial, ov in zip(trials, overrides, strict=True):
                self._launch(study, [trial], [ov])
            return
        for t in trials:
            sweeps.lend_trial(t.number, t)
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
        finally:
            pruned = {t.number for t in trials if sweeps.return_trial(t.number)}
        failures = []
        for trial, ret in zip(trials, returns, strict=True):
            if trial.number in pruned:
                study.tell(trial, state=TrialState.PRUNED)
                continue
            try:
                value = ret.return_value
                values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
                study.tell(trial, values=values if len(values) > 1 else values[0])
            except Exception as e:
                study.tell(trial, state=TrialState.FAIL)
                log.warning("Trial %d failed: %s", trial.number, e)
                failures.append(e)
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            log.error(
                "Failed %d of %d trials with max_failure_rate=%s", len(failures), len(returns), self.max_failure_rate
            )
            for ret in returns:
                ret.return_value  # noqa: B018  (raises the job's own exception, with its traceback)

    def _save_results(self, study: optuna.Study, directions: list[str], sweep_dir: Path) -> None:
        n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if n == 0:
            log.warning("No trial of the study completed: no best parameters")
            results: dict[str, Any] = {"name": "optuna", "n_complete": 0}
        elif len(directions) < 2:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value, "n_complete": n}
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s", best.value)
        else:
            front = [{"params": t.params, "values": t.values} for t in study.best_trials]
            results = {"name": "optuna", "solutions": front, "n_complete": n}
        results["n_trials"] = len(study.get_trials(deepcopy=False))
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def _make_sampler(sampler: Any, offset: int) -> Any:
    """A sampler given as a partial (``_partial_: true``) is built here; its ``seed``, when set, is
    offset by the number of trials already in the study (a resumed search draws new points)."""
    if not isinstance(sampler, functools.partial):
        return sampler
    seed = sampler.keywords.get("seed")
    if seed is not None and offset:
        return sampler(seed=int(seed) + offset)
    return sampler()


def _product(values: Any) -> int:
    out = 1
    for v in values:
        out *= v
    return out
