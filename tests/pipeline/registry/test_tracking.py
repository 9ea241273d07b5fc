"""The store: fail-fast checks and names; the trial logger: one MLflow run per Ray Tune trial (real Ray)."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers.mlflow_server import free_port
from helpers.paths import TESTS
from mlflow import MlflowClient

from invdyn._download import redact_url
from pipeline.registry import store
from pipeline.registry.register import register_dataset
from pipeline.registry.trial_logger import MlflowTrialLogger


def test_default_uri_and_resolution(tmp_path, monkeypatch):
    uri = store.default_uri(tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    assert store.artifact_root(uri) == (tmp_path / "out" / "mlartifacts").resolve().as_uri()
    assert store.resolve_uri(None, tmp_path / "out") == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.resolve_uri(None, tmp_path / "out") == "http://127.0.0.1:5000"
    assert store.resolve_uri("http://h:1", tmp_path / "out") == "http://h:1"
    assert store.model_name("sim-hopper-random-v0") == "invdyn-sim-hopper-random-v0"
    assert store.model_name("minari:mujoco/hopper/expert-v0") == "invdyn-minari-mujoco-hopper-expert-v0"
    # messages show a URI through invdyn's one redactor; a SQLite path is shown as it is
    assert redact_url("https://user:secret@host:5000/x?token=t") == "https://***@host:5000/x?token=***"
    assert redact_url(uri) == uri


def test_check_server_sqlite_and_file_stores(tmp_path):
    store.check_server(store.default_uri(tmp_path / "new" / "dir"))  # creates the folder
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(store.TrackingError, match="cannot create folder"):
        store.check_server(store.default_uri(tmp_path / "file" / "sub"))
    with pytest.raises(store.TrackingError, match="needs a database store"):
        store.check_server(str(tmp_path / "mlruns"))


def test_check_server_fails_fast_and_says_what_to_do():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(store.TrackingError) as err:
        store.check_server(uri)
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert uri in message and "mlflow server" in message and "MLFLOW_TRACKING_URI" in message


def test_check_server_refuses_a_server_that_is_not_mlflow():
    class NotMlflow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(store.TrackingError, match="HTTP 404.*is it an MLflow tracking server"):
            store.check_server(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_experiments_open_in_the_model_training_view(tmp_path):
    """MLflow 3's UI picks an experiment's view by its `mlflow.experimentKind` tag: every experiment the
    pipeline makes or reuses gets the model-training one, unless someone already chose a view."""
    uri = store.default_uri(tmp_path / "out")
    client = store.client(uri)
    kind = lambda exp_id: client.get_experiment(exp_id).tags.get(store.EXPERIMENT_KIND_TAG)  # noqa: E731
    assert kind("0") is None  # MLflow's own "Default", made with the SQLite store
    made = store.get_experiment_id(client, uri, "job-new")
    assert kind(made) == "custom_model_development"
    assert kind("0") == "custom_model_development"  # in a store of ours, every experiment opens the same way
    older = client.create_experiment("job-old")  # made before the pipeline tagged experiments
    assert kind(older) is None
    assert (
        store.get_experiment_id(client, uri, "job-old") == older and kind(older) == "custom_model_development"
    )
    chosen = client.create_experiment("job-chosen", tags={store.EXPERIMENT_KIND_TAG: "genai_development"})
    assert (
        store.get_experiment_id(client, uri, "job-chosen") == chosen and kind(chosen) == "genai_development"
    )
    client.delete_experiment(made)
    assert (
        store.get_experiment_id(client, uri, "job-new") == made and kind(made) == "custom_model_development"
    )
    # a registration whose trial was never tracked makes its run in `invdyn-registry`: tagged too
    from helpers.mlflow_server import model_record

    result = register_dataset(uri, model_record(tmp_path, "sim-a-v0", 1, 0.3))
    registry = client.get_experiment_by_name(store.REGISTRY_EXPERIMENT)
    assert client.get_run(result["run_id"]).info.experiment_id == registry.experiment_id
    assert registry.tags[store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # MLflow 3.x's UI follows its own GenAI / training switch over the tag: the printed link chooses
    url = "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    assert store.experiment_url("http://127.0.0.1:5000/", "7") == url
    assert store.where_to_look("http://127.0.0.1:5000", "7") == url
    assert f"mlflow ui --backend-store-uri {uri} " in store.where_to_look(uri, "7")


def test_artifact_progress_bars_are_off_unless_the_user_turns_them_on(tmp_path, monkeypatch):
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    store.client(store.default_uri(tmp_path / "a"))
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    store.client(store.default_uri(tmp_path / "b"))
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is True


def _trainable(config):
    """A Tune trial that reports a growing learning curve per epoch; the model dir comes at the end,
    either as `model_dir` in the result or only inside the checkpoint (both shapes occur)."""
    import tempfile

    from helpers.mlflow_server import model_record
    from ray import tune

    if config["fail"]:
        raise RuntimeError("injected failure")
    curve = []
    for epoch in range(3):
        curve.append(
            {
                "epoch": epoch,
                "step": 10 * (epoch + 1),
                "train_loss": 1.0 / (epoch + 1),
                "val_mse": 0.5 - 0.1 * epoch,
            }
        )
        report = {
            "dataset": config["dataset"],
            "sha256": "c" * 64,
            "curve": list(curve),
            "val_mse": curve[-1]["val_mse"],
        }
        if epoch < 2:
            tune.report(report)
            continue
        tmp = Path(tempfile.mkdtemp(dir=config["root"]))
        record = model_record(tmp, config["dataset"], config["seed"], 0.3)
        report.update(heldout_mse=0.3, baseline_mse=1.0)
        if config["model_dir_in_result"]:
            report["model_dir"] = record["model_dir"]
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(tmp)))


@pytest.mark.slow
def test_trial_logger_logs_one_run_per_trial(tmp_path, monkeypatch):
    import ray
    from ray import tune

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # the trials unpickle `_trainable` from this module and import helpers.mlflow_server
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(Path(__file__).parent)]))
    uri = store.default_uri(tmp_path / "out")
    callback = MlflowTrialLogger(uri, "job-x", "job-x")
    space = {
        "dataset": tune.grid_search(["sim-a-v0", "sim-b-v0"]),
        "model_dir_in_result": tune.grid_search([True, False]),
        "fail": False,
        "seed": 1,
        "root": str(tmp_path),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": 1}),
            param_space=space,
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), callbacks=[callback], verbose=0),
        )
        grid = tuner.fit()
        failing = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": 1}),
            param_space={**space, "dataset": "sim-a-v0", "model_dir_in_result": True, "fail": True},
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), callbacks=[callback], verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert not grid.errors and failing.errors
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("job-x")
    assert exp.tags[store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert exp.artifact_location.startswith((tmp_path / "out" / "mlartifacts").resolve().as_uri())
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.data.tags["dataset"]: r for r in runs if r.data.tags.get("invdyn_kind") == "dataset"}
    trials = [r for r in runs if r.data.tags.get("invdyn_kind") == "trial"]
    assert sorted(parents) == ["sim-a-v0", "sim-b-v0"] and len(trials) == 5
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == 4 and [r.info.status for r in trials if r not in finished] == ["FAILED"]
    for run in finished:
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parents[tags["dataset"]].info.run_id and tags["job"] == "job-x"
        assert params["dataset"] == tags["dataset"] and params["sha256"] == "c" * 64 and params["seed"] == "1"
        assert run.data.metrics["heldout_mse"] == 0.3
        history = client.get_metric_history(run.info.run_id, "val_mse")
        assert [(m.step, round(m.value, 6)) for m in history] == [(10, 0.5), (20, 0.4), (30, 0.3)]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [10, 20, 30]
        files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, store.MODEL_ARTIFACT)}
        assert {"params.json", "model.ckpt", "README.md"} <= files
        assert callback.run_id(tags["ray_trial_id"]) == run.info.run_id
    # registration reuses the trial's logged artifacts (found by trial id), no second upload
    best = finished[0]
    record = {
        "dataset": best.data.tags["dataset"],
        "sha256": "c" * 64,
        "heldout_mse": 0.3,
        "baseline_mse": 1.0,
        "model_dir": str(_download(client, best.info.run_id, tmp_path / "dl")),
        "trial_id": best.data.tags["ray_trial_id"],
    }
    result = register_dataset(uri, record)
    assert result["run_id"] == best.info.run_id and result["source"].endswith(f"/{store.MODEL_ARTIFACT}")
    assert result["champion"]


def _download(client, run_id, dst):
    return Path(client.download_artifacts(run_id, store.MODEL_ARTIFACT, str(dst)))
