"""The Ray Tune callback that logs one MLflow run per trial, from the job's driver (trials never write)."""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.tune import Callback

from invdyn._download import redact_url
from invdyn._files import sha256_file
from invdyn.model_dir import PARAMS_FILE
from pipeline.registry import store
from pipeline.registry.export import find_model_dir

log = logging.getLogger(__name__)

# Result keys Ray Tune adds by itself: bookkeeping, not metrics of the model.
_TUNE_KEYS = {
    "training_iteration",
    "time_this_iter_s",
    "timestamp",
    "pid",
    "iterations_since_restore",
    "time_since_restore",
    "timesteps_total",
    "episodes_total",
    "timesteps_since_restore",
    "done",
    "trial_id",
    "date",
    "hostname",
    "node_ip",
    "config",
    "checkpoint_dir_name",
    "should_checkpoint",
    "experiment_tag",
    "episode_reward_mean",
    "warmup_time",
    "experiment_id",
}
_CURVE_INDEX_KEYS = {"epoch", "step"}


class MlflowTrialLogger(Callback):
    """Ray Tune callback (runs in the driver): one MLflow run per trial, nested in a run per dataset.

    Logs the trial's config and dataset as params, each learning-curve point (`result["curve"]`: dicts
    with "step"/"epoch" and metrics) at its training step, the final numeric results, and at the end
    the trial's model directory (`result["model_dir"]`, else the model directory inside the trial's
    latest checkpoint) as artifacts under `model/`. A transient failure (server restarting) is retried
    with backoff; if MLflow still fails three times in a row, tracking is switched off for the rest of the
    job with a warning: training never stops for tracking.
    """

    def __init__(self, uri: str, experiment: str, job_name: str):
        self.uri, self.experiment, self.job_name = uri, experiment, job_name
        self.run_ids: dict[str, str] = {}  # trial id -> MLflow run id
        self.parent_run_ids: dict[str, str] = {}  # dataset -> parent MLflow run id
        self._logged_params: dict[str, set] = {}
        self._logged_points: dict[str, set] = {}
        self._failures = 0
        self._disabled = False
        self._client_obj = None
        self._experiment_id = None

    def __getstate__(self):  # Tune may pickle callbacks with the run config; clients do not pickle
        state = dict(self.__dict__)
        state["_client_obj"] = None
        return state

    @property
    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            self._client_obj = store.client(self.uri)
        return self._client_obj

    def run_id(self, trial_id: str) -> str | None:
        """The MLflow run id of a trial (put it into the registration record as `mlflow_run_id`)."""
        return self.run_ids.get(trial_id)

    # -- Tune hooks --------------------------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info):
        for run_key, config, part in _runs(trial, result):
            self._safely("log a result", self._log_result, run_key, config, part)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safely("finish a run", self._finish, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safely("mark a run failed", self._finish, trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        for run_id in self.parent_run_ids.values():
            self._safely("close a dataset run", self._client.set_terminated, run_id, "FINISHED")

    # -- work --------------------------------------------------------------------------------
    def _safely(self, what, fn, *args):
        if self._disabled:
            return
        try:
            # A server restart or a short outage is waited out (1, 2, 4, ... s), so no trial goes unrecorded;
            # meanwhile only the driver's event handling waits, the trials keep training.
            store.retry(f"MLflow: {what}", lambda: fn(*args))
            self._failures = 0
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._failures += 1
            log.warning("MLflow (%s): could not %s: %s: %s", redact_url(self.uri), what, type(e).__name__, e)
            if self._failures >= 3:
                self._disabled = True
                log.warning(
                    "MLflow at %s failed 3 times in a row: tracking is off for the rest of this job; "
                    "models stay in the job's output and `python -m pipeline.register --from-storage DIR` "
                    "registers them later",
                    redact_url(self.uri),
                )

    def _dataset(self, config: dict, result: dict) -> str:
        for source in (result, config, config.get("train_loop_config") or {}):
            name = source.get("dataset") or source.get("dataset_name")
            if isinstance(name, str) and name:
                return name
        return "unknown"

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = store.get_experiment_id(self._client, self.uri, self.experiment)
            where = store.where_to_look(self.uri, self._experiment_id)
            print(f"MLflow: experiment {self.experiment!r} at {where}", flush=True)
        return self._experiment_id

    def _find_run(self, filter_string: str) -> str | None:
        runs = self._client.search_runs([self._experiment()], filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def _parent(self, dataset: str, start_time: int | None) -> str:
        if dataset not in self.parent_run_ids:
            # A resumed job (same job name) goes on in the same parent run.
            found = self._find_run(
                f"tags.invdyn_kind = 'dataset' and tags.dataset = '{store.quote(dataset)}' "
                f"and tags.job = '{store.quote(self.job_name)}'"
            )
            if found is None:
                tags = {"dataset": dataset, "job": self.job_name, "invdyn_kind": "dataset"}
                run = self._client.create_run(
                    self._experiment(), start_time=start_time, tags=tags, run_name=dataset
                )
                found = run.info.run_id
            self.parent_run_ids[dataset] = found
        return self.parent_run_ids[dataset]

    def _run(self, trial_id: str, config: dict, result: dict) -> str:
        """The MLflow run of `trial_id` (a Tune trial's id, or a population member's), made on first use."""
        if trial_id not in self.run_ids:
            dataset = self._dataset(config, result)
            start_time = _start_time(result)
            parent = self._parent(dataset, start_time)
            found = self._find_run(
                f"tags.ray_trial_id = '{store.quote(trial_id)}' and tags.job = '{store.quote(self.job_name)}'"
            )
            if found is None:
                tags = {
                    "dataset": dataset,
                    "job": self.job_name,
                    "ray_trial_id": trial_id,
                    "invdyn_kind": "trial",
                    "mlflow.parentRunId": parent,
                    "code_version": store.code_version(),
                }
                run = self._client.create_run(
                    self._experiment(), start_time=start_time, tags=tags, run_name=f"{dataset}/{trial_id}"
                )
                found = run.info.run_id
            self.run_ids[trial_id] = found
            self._logged_params[trial_id] = set()
            self._logged_points[trial_id] = set()
        return self.run_ids[trial_id]

    def _log_result(self, trial_id: str, config: dict, result: dict) -> None:
        run_id = self._run(trial_id, config, result)
        now = int(time.time() * 1000)
        # Params: the trial's config (flattened) plus what the result says about the data.
        params = store.flatten(config)
        for key in ("dataset", "sha256", "dataset_sha256", "architecture", "split", "seed"):
            if key in result and not isinstance(result[key], (dict, list)):
                params.setdefault(key, result[key])
        new_params = [
            Param(k, store.param_value(v))
            for k, v in sorted(params.items())
            if k not in self._logged_params[trial_id]
        ]
        self._logged_params[trial_id].update(p.key for p in new_params)
        # Learning curve: each point at its training step.
        metrics, points = [], self._logged_points[trial_id]
        curve = result.get("curve") if isinstance(result.get("curve"), list) else []
        for point in curve:
            if not isinstance(point, dict):
                continue
            step = int(_metric_value(point.get("step")) or _metric_value(point.get("epoch")) or 0)
            for key, value in point.items():
                number = _metric_value(value)
                if key in _CURVE_INDEX_KEYS or number is None or (key, step) in points:
                    continue
                points.add((key, step))
                metrics.append(Metric(_metric_key(key), number, now, step))
        # Final / current scalars of this result.
        step = _metric_value(result.get("step"))
        if step is None:
            last = curve[-1] if curve and isinstance(curve[-1], dict) else {}
            step = _metric_value(last.get("step")) or _metric_value(result.get("training_iteration")) or 0
        for key, value in result.items():
            number = _metric_value(value)
            if key in _TUNE_KEYS or key in _CURVE_INDEX_KEYS or number is None or (key, int(step)) in points:
                continue
            points.add((key, int(step)))
            metrics.append(Metric(_metric_key(key), number, now, int(step)))
        tags = []
        sha = result.get("sha256") or result.get("dataset_sha256")
        if isinstance(sha, str):
            tags.append(RunTag("dataset_sha256", sha))
        store.log_batch(self._client, run_id, metrics=metrics, params=new_params, tags=tags)

    def _finish(self, trial, status: str) -> None:
        result = trial.last_result or {}
        for run_key, config, part in _runs(trial, result):
            run_id = self._run(run_key, config, part)
            if status == "FINISHED":
                member = part.get("key") if run_key != trial.trial_id else None
                self._upload_model(trial, part, run_id, member)
            else:
                error = getattr(trial, "error_file", None)
                self._client.set_tag(
                    run_id, "error", f"trial {trial.trial_id} failed; see {error or 'the Ray logs'}"
                )
            self._client.set_terminated(run_id, status)

    def _upload_model(self, trial, result: dict, run_id: str, member: str | None = None) -> None:
        """Log the model directory: the result's `model_dir`, else the trial's checkpoint; a population
        member's is the folder named by its key inside either."""
        sub = member or ""
        model_dir = result.get("model_dir")
        model_dir = f"{model_dir}/{sub}" if model_dir and sub else model_dir
        if model_dir and Path(model_dir).is_dir() and find_model_dir(model_dir):
            self._log_model_dir(run_id, find_model_dir(model_dir))
            return
        checkpoint = trial.checkpoint
        if checkpoint is None:
            log.warning(
                "trial %s reported no model_dir and no checkpoint: no model artifacts logged", trial.trial_id
            )
            return
        with tempfile.TemporaryDirectory(prefix="invdyn-ckpt-") as tmp:
            here = Path(checkpoint.path) / sub  # a checkpoint on this file system is read where it is
            local = here if sub and here.is_dir() else Path(checkpoint.to_directory(tmp)) / sub
            found = find_model_dir(local)
            if found is None:
                log.warning(
                    "checkpoint %s of trial %s holds no model directory", checkpoint.path, trial.trial_id
                )
                return
            self._log_model_dir(run_id, found)

    def _log_model_dir(self, run_id: str, model_dir: Path) -> None:
        self._client.log_artifacts(run_id, str(model_dir), store.MODEL_ARTIFACT)
        self._client.set_tag(run_id, "weights_sha256", store.weights_sha256(model_dir))
        self._client.set_tag(run_id, "params_sha256", sha256_file(Path(model_dir) / PARAMS_FILE))


def _runs(trial, result: dict) -> list[tuple[str, dict, dict]]:
    """(run key, params, result) of each MLflow run of a trial: the trial's own, or for a population trial
    (`result["members"]`, pipeline.job.populations) one per member, keyed `<trial id>-m<index>` as the
    job's ledger names it (pipeline.job.records.member_trial_id), with the member's config as params and its
    metrics and curve over the population's shared ones (node, device, timings)."""
    config = trial.config or {}
    members = result.get("members")
    if not isinstance(members, list):
        return [(trial.trial_id, config, result)]
    shared = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    base = {k: config[k] for k in ("dataset", "sha256") if k in config}
    runs = []
    for m in members:
        own = {k: v for k, v in m.items() if k != "config"}
        params = {**base, "key": m.get("key"), **(m.get("config") or {})}
        runs.append((f"{trial.trial_id}-m{m.get('index')}", params, {**shared, **own}))
    return runs


def _start_time(result: dict) -> int | None:
    """When the trial started (ms), from Tune's own clock: a trial reports once, at its end, and the
    run's duration in the UI should be the trial's, not the moment of logging."""
    end, took = _metric_value(result.get("timestamp")), _metric_value(result.get("time_total_s"))
    return int((end - took) * 1000) if end is not None and took is not None else None


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))


def _metric_value(v) -> float | None:
    """A finite int or float reported by a trial (strings and flags are not metrics)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None
