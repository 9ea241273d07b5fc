"""`pipeline.pretrain_all` with a real `mlflow server`: registers champions, exports the bundle, never moves
champion to a worse model, fails fast when the server is down, and recovers when it goes down mid-job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers.mlflow_server import MlflowServer, free_port
from helpers.paths import REPO
from mlflow import MlflowClient

import invdyn
from pipeline.registry import store

pytestmark = pytest.mark.slow

CHEETAH, HOPPER = "sim-halfcheetah-random-v0", "sim-hopper-random-v0"


def job_env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "INVDYN_"))}
    for var, sub in (("INVDYN_HOME", "invdyn-home"), ("D4RL_DATASET_DIR", "d4rl"), ("HOME", "home")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def job_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.job.pretrain_all", "--verbose", "0", *map(str, args)]


def run_job(args, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(job_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    return proc


def summary(out: Path) -> dict:
    return {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def first_job(server, sim_files, tmp_path_factory):
    """The issue's command: two simulated datasets, 3 epochs, a server, an exported bundle."""
    root = tmp_path_factory.mktemp("job1")
    out, bundle = root / "out", root / "invdyn-bundle.zip"
    datasets = f"{sim_files[CHEETAH]},{sim_files[HOPPER]}"
    args = [
        "--datasets",
        datasets,
        "--max-epochs",
        3,
        "--mlflow-uri",
        server.uri,
        "--export",
        bundle,
        "--out",
        out,
    ]
    proc = run_job(args, job_env(root))
    return {"proc": proc, "out": out, "bundle": bundle, "root": root}


def test_job_fails_fast_when_the_server_is_down(sim_files, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # no server there
    out = tmp_path / "out"
    proc = run_job(["--datasets", sim_files[HOPPER], "--mlflow-uri", uri, "--out", out], job_env(tmp_path))
    assert proc.returncode == 2
    assert uri in proc.stderr and "mlflow server" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "ray").exists() and not (out / "models").exists()  # nothing started training


def test_job_tracks_registers_and_exports_two_champions(first_job, server, monkeypatch):
    assert first_job["proc"].returncode == 0, first_job["proc"].stderr[-3000:]
    records = summary(first_job["out"])
    client = MlflowClient(server.uri, registry_uri=server.uri)
    for ds in (CHEETAH, HOPPER):
        reg = records[ds]["registration"]
        assert (reg["model_name"], reg["version"], reg["champion"]) == (f"invdyn-{ds}", "1", True)
        assert client.get_model_version_by_alias(f"invdyn-{ds}", "champion").version == "1"
        # the registered version is the trial's own run: params, learning curve, model artifacts
        run = client.get_run(reg["run_id"])
        assert run.data.tags["invdyn_kind"] == "trial" and run.data.params["dataset"] == ds
        assert run.data.params["sha256"] == records[ds]["sha256"] and run.data.params["hidden_dim"] == "512"
        curve = client.get_metric_history(reg["run_id"], "val_mse")
        assert len(curve) == 3 and curve[0].step < curve[1].step < curve[2].step
        assert run.data.metrics["heldout_mse"] == pytest.approx(records[ds]["heldout_mse"])
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["invdyn_kind"] == "dataset" and parent.info.run_name == ds
        assert client.get_experiment(run.info.experiment_id).name == records[ds]["job"]
    # the bundle holds exactly the champions and predicts like them, offline
    manifest = invdyn.verify_bundle(first_job["bundle"])
    assert sorted(m["name"] for m in manifest["models"]) == [CHEETAH, HOPPER]
    assert {(m["model_name"], m["version"]) for m in manifest["registry"]["models"]} == {
        (f"invdyn-{CHEETAH}", "1"),
        (f"invdyn-{HOPPER}", "1"),
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    rng = np.random.default_rng(0)
    inputs, expected = {}, {}
    for ds in (CHEETAH, HOPPER):
        champion = invdyn.load(ds, source=f"models:/invdyn-{ds}@champion")
        obs = rng.normal(size=(16, champion.obs_dim)).astype(np.float32)
        inputs[ds] = (obs, obs + 0.1)
        expected[ds] = champion.predict(*inputs[ds])
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    invdyn.fetch(first_job["bundle"], progress=False)
    for ds in (CHEETAH, HOPPER):
        np.testing.assert_array_equal(invdyn.load(ds).predict(*inputs[ds]), expected[ds])


def rest(server, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call to MLflow's REST API, as the UI makes it (GET with a query, or POST with a JSON body)."""
    url = f"{server.uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_ui_sees_a_training_experiment_nested_runs_curves_and_the_champion(first_job, server):
    """What `mlflow ui` shows, read through the REST API it reads: the experiment opens as model training,
    the dataset run holds its trials, the curves have several steps, the champion links its source run."""
    assert first_job["proc"].returncode == 0, first_job["proc"].stderr[-3000:]
    assert "Downloading artifacts" not in first_job["proc"].stderr  # export's bars are off
    records = summary(first_job["out"])
    exp = rest(server, "experiments/get-by-name", experiment_name=records[HOPPER]["job"])["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs = rest(server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
    for ds in (CHEETAH, HOPPER):
        reg = records[ds]["registration"]
        dataset_runs = [i for i, t in tags.items() if t["invdyn_kind"] == "dataset" and t["dataset"] == ds]
        assert len(dataset_runs) == 1 and "mlflow.parentRunId" not in tags[dataset_runs[0]]
        trials = [i for i, t in tags.items() if t.get("mlflow.parentRunId") == dataset_runs[0]]
        assert reg["run_id"] in trials and all(tags[i]["invdyn_kind"] == "trial" for i in trials)
        assert tags[dataset_runs[0]]["registered_model"] == f"invdyn-{ds}"
        for key in ("val_mse", "train_loss"):
            points = rest(server, "metrics/get-history", run_id=reg["run_id"], metric_key=key)["metrics"]
            steps = [int(m["step"]) for m in points]
            assert len(steps) >= 3 and steps == sorted(set(steps)) and steps[0] > 0, (key, steps)
        name = f"invdyn-{ds}"
        version = rest(server, "registered-models/alias", name=name, alias="champion")["model_version"]
        run = rest(server, "runs/get", run_id=reg["run_id"])["run"]
        assert version["run_id"] == reg["run_id"]  # the version page links this run
        # its duration in the runs table is the trial's, not the instant the driver logged it
        took = {m["key"]: m["value"] for m in run["data"]["metrics"]}["time_total_s"]
        assert int(run["info"]["end_time"]) - int(run["info"]["start_time"]) >= 900 * took > 0
        # its files: the trial run's model/ (model-<params sha>/ when the evaluation changed the card)
        assert version["source"].startswith(f"{run['info']['artifact_uri']}/model")
        version_tags = {t["key"]: t["value"] for t in version["tags"]}
        assert version_tags["dataset_sha256"] == records[ds]["sha256"]
        assert float(version_tags["heldout_mse"]) == pytest.approx(records[ds]["heldout_mse"])
        assert len(version_tags["protocol"]) >= 8 and version_tags["champion_decision"]
        model = rest(server, "registered-models/get", name=name)["registered_model"]
        assert {a["alias"]: a["version"] for a in model["aliases"]}["champion"] == version["version"]


def test_worse_run_registers_a_version_but_keeps_the_champion(first_job, server, sim_files):
    root = first_job["root"] / "worse"
    out = root / "out"
    args = [
        "--datasets",
        sim_files[HOPPER],
        "--max-epochs",
        1,
        "--search-space",
        '{"hidden_dim": [16]}',
        "--mlflow-uri",
        server.uri,
        "--export",
        root / "b.zip",
        "--out",
        out,
    ]
    proc = run_job(args, job_env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reg = summary(out)[HOPPER]["registration"]
    assert (reg["version"], reg["champion"], reg["champion_version"]) == ("2", False, "1")
    assert "does not beat champion v1" in reg["reason"]
    client = MlflowClient(server.uri, registry_uri=server.uri)
    assert client.get_model_version_by_alias(f"invdyn-{HOPPER}", "champion").version == "1"
    exported = invdyn.verify_bundle(root / "b.zip")["registry"]["models"]
    assert [(m["name"], m["version"]) for m in exported] == [(HOPPER, "1")]  # the champion, not this run


def test_server_stopped_before_registration_then_register_from_storage(server, sim_files, tmp_path):
    out = tmp_path / "out"
    args = [
        "--datasets",
        sim_files[CHEETAH],
        "--max-epochs",
        2,
        "--search-space",
        '{"hidden_dim": [24]}',
        "--mlflow-uri",
        server.uri,
        "--export",
        tmp_path / "b.zip",
        "--out",
        out,
    ]
    env = job_env(tmp_path, INVDYN_MLFLOW_RETRIES="2")
    with open(tmp_path / "stderr.txt", "w") as err:
        job = subprocess.Popen(
            job_cmd(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
        try:
            lines = []
            for line in job.stdout:  # training finished: the server goes down before the job registers
                lines.append(line)
                if "[1/1 done" in line:
                    server.stop()
                    break
            lines += job.stdout.readlines()
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    print("".join(lines)[-3000:], stderr[-3000:], sep="\n")
    try:
        assert any("[1/1 done" in ln for ln in lines), "the job never finished its trial"
        record = summary(out)[CHEETAH]
        assert "error" in record["registration"] and "python -m pipeline.register --from-storage" in stderr
        model_dir = Path(record["model_dir"])
        assert (model_dir / "params.json").is_file() and not (tmp_path / "b.zip").exists()
    finally:
        server.start()  # (a no-op if it is still running)
    cli = [
        sys.executable,
        "-m",
        "pipeline.registry.register",
        "--from-storage",
        out,
        "--mlflow-uri",
        server.uri,
    ]
    proc = subprocess.run(list(map(str, cli)), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sha = store.weights_sha256(model_dir)
    client = MlflowClient(server.uri, registry_uri=server.uri)
    found = client.search_model_versions(f"name = 'invdyn-{CHEETAH}' and tag.weights_sha256 = '{sha}'")
    assert len(found) == 1 and found[0].tags["dataset_sha256"] == record["sha256"]
