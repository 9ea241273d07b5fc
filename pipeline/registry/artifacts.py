"""Where a registered version's files come from: the trial's logged run when it holds the same files,
else a fresh upload (into the trial's run, or a run of its own in the experiment `invdyn-registry`)."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from invdyn._files import sha256_file
from invdyn.model_dir import PARAMS_FILE, read_params
from pipeline.quality.metrics import finite
from pipeline.registry import store
from pipeline.registry.store import MODEL_ARTIFACT

#: the test-episode metrics of params.json a registration run logs beside heldout_mse / baseline_mse
TEST_METRICS = ("test_mse", "test_mse_normalized", "test_r2", "test_baseline_mse")


def _find_trial_run(client: MlflowClient, record: dict):
    """The run the trial logger logged for this record's trial (by id, else by trial tag)."""
    run_id = record.get("mlflow_run_id")
    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            pass
    trial_id = record.get("trial_id")
    if not trial_id:
        return None
    experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    if not experiments:
        return None
    filt = (
        f"tags.ray_trial_id = '{store.quote(trial_id)}' and tags.dataset = '{store.quote(record['dataset'])}'"
    )
    if record.get("job"):
        filt += f" and tags.job = '{store.quote(record['job'])}'"
    runs = client.search_runs(experiments, filt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _new_run(client: MlflowClient, uri: str, record: dict, model_dir: Path):
    """A run in the record's experiment (or `invdyn-registry`) for a model whose trial was never tracked."""
    experiment = store.get_experiment_id(client, uri, record.get("experiment") or store.REGISTRY_EXPERIMENT)
    tags = {
        "dataset": record["dataset"],
        "invdyn_kind": "registration",
        "ray_trial_id": str(record.get("trial_id", "")),
        "job": str(record.get("job", "")),
    }
    run = client.create_run(experiment, tags=tags, run_name=f"{record['dataset']}/register")
    config = store.flatten(record.get("config") or {})
    params = [Param(k, store.param_value(v)) for k, v in sorted(config.items())]
    now = int(time.time() * 1000)
    numbers = {k: finite(record.get(k)) for k in ("heldout_mse", "baseline_mse")}
    tested = (read_params(model_dir / PARAMS_FILE).get("metrics") or {}) if model_dir else {}
    numbers.update({k: finite(tested.get(k)) for k in TEST_METRICS})  # the test episodes' figures
    metrics = [Metric(k, v, now, 0) for k, v in numbers.items() if v is not None]
    store.log_batch(client, run.info.run_id, metrics=metrics, params=params)
    return run


def source_for(client: MlflowClient, uri: str, record: dict, model_dir: Path, sha: str) -> tuple[str, str]:
    """(artifact URI of the model directory, run id): the trial's logged artifacts when they are the
    same files (weights and params.json: an evaluation attached after the trial changes params.json and
    the card), else a fresh upload (into the trial's run, or a new run in `invdyn-registry`)."""
    run = _find_trial_run(client, record)
    params_sha = sha256_file(model_dir / PARAMS_FILE)
    if run is not None and (run.data.tags.get("weights_sha256"), run.data.tags.get("params_sha256")) == (
        sha,
        params_sha,
    ):
        return f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run.info.run_id
    if run is None:
        run, path = _new_run(client, uri, record, model_dir), MODEL_ARTIFACT
    elif client.list_artifacts(run.info.run_id, MODEL_ARTIFACT):
        path = f"{MODEL_ARTIFACT}-{params_sha[:12]}"  # the trial's run logged other files under model/
    else:
        path = MODEL_ARTIFACT  # the trial's upload never happened (MLflow was down when it finished)
    client.log_artifacts(run.info.run_id, str(model_dir), path)
    if path == MODEL_ARTIFACT:
        client.set_tag(run.info.run_id, "weights_sha256", sha)
        client.set_tag(run.info.run_id, "params_sha256", params_sha)
    if run.info.status == "RUNNING":  # its trial is over: we hold its model
        client.set_terminated(run.info.run_id, "FINISHED")
    return f"{run.info.artifact_uri}/{path}", run.info.run_id
