"""Model registry on real MLflow: champion only for a better model, races, outages, recovery from storage."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.mlflow_server import MlflowServer, model_record
from helpers.paths import REPO
from mlflow import MlflowClient

import invdyn
from pipeline.registry import store
from pipeline.registry.champion import choose_champion, settle_champion
from pipeline.registry.register import register_dataset, register_from_storage


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


def _versions(uri, name):
    return {
        str(v.version): v
        for v in MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{name}'")
    }


def _champion(uri, name):
    return str(MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version)


def test_choose_champion_compares_only_the_newest_data():
    def v(n, mse, sha):
        return SimpleNamespace(version=str(n), tags={"heldout_mse": str(mse), "dataset_sha256": sha})

    assert choose_champion([]) is None
    assert choose_champion([v(1, 0.5, "a"), v(2, 0.7, "a"), v(3, 0.3, "a")]) == "3"
    assert choose_champion([v(1, 0.3, "a"), v(2, 0.3, "a")]) == "1"  # a tie does not move it
    # version 3 is on new data: the (lower) MSEs on the old data do not count any more
    assert choose_champion([v(1, 0.1, "a"), v(2, 0.2, "a"), v(3, 0.9, "b")]) == "3"
    assert choose_champion([v(1, 0.1, "a"), v(2, "nan", "a")]) == "1"


def test_champion_moves_only_to_a_better_model_sqlite(tmp_path, monkeypatch):
    uri = store.default_uri(tmp_path / "job")
    store.check_server(uri)
    ds, name = "sim-hopper-random-v0", "invdyn-sim-hopper-random-v0"
    first = register_dataset(uri, model_record(tmp_path, ds, 1, 0.5))
    assert (first["model_name"], first["version"], first["champion"]) == (name, "1", True)
    worse = register_dataset(uri, model_record(tmp_path, ds, 2, 0.7))
    assert (worse["version"], worse["champion"]) == ("2", False)
    assert "does not beat champion v1" in worse["reason"]
    better_record = model_record(tmp_path, ds, 3, 0.3)
    better = register_dataset(uri, better_record)
    assert (better["version"], better["champion"]) == ("3", True) and "beats champion v1" in better["reason"]
    # the same weights again (a retried job): no new version
    again = register_dataset(uri, better_record)
    assert (again["version"], again["registered"], again["champion"]) == ("3", False, True)
    versions = _versions(uri, name)
    assert sorted(versions) == ["1", "2", "3"] and _champion(uri, name) == "3"
    tags = versions["3"].tags
    assert tags["dataset"] == ds and tags["dataset_sha256"] == "a" * 64 and float(tags["heldout_mse"]) == 0.3
    assert float(tags["baseline_mse"]) == 1.0 and tags["ray_trial_id"] == better_record["trial_id"]
    assert json.loads(tags["config"])["seed"] == 3 and tags["code_version"]
    assert tags["champion_decision"] == better["reason"]
    # artifacts live beside the SQLite store, never in the working directory
    assert (tmp_path / "job" / "mlartifacts").is_dir() and not Path("mlruns").exists()
    # invdyn.load reads the champion straight from the registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = invdyn.load(ds, source=f"models:/{name}@champion")
    expected = invdyn.read_model_dir(better_record["model_dir"])
    obs = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    nxt = obs + 0.1
    np.testing.assert_array_equal(model.predict(obs, nxt), expected.predict(obs, nxt))
    # new data (another sha256): champion moves even with a higher MSE, and the reason says why
    new_data = register_dataset(uri, model_record(tmp_path, ds, 4, 0.9, sha256="b" * 64))
    assert new_data["champion"] and "new data" in new_data["reason"]


def test_bad_records_are_refused_with_the_reason(tmp_path):
    uri = store.default_uri(tmp_path / "job")
    with pytest.raises(store.TrackingError, match=r"lacks \['heldout_mse'\]"):
        register_dataset(uri, {"dataset": "sim-x-v0", "model_dir": str(tmp_path)})
    with pytest.raises(store.TrackingError, match="does not exist"):
        register_dataset(uri, {"dataset": "sim-x-v0", "heldout_mse": 0.1, "model_dir": str(tmp_path / "no")})
    record = model_record(tmp_path, "sim-x-v0", 1, 0.1)
    (Path(record["model_dir"]) / "model.ckpt").write_bytes(b"truncated")
    with pytest.raises(invdyn.ChecksumError, match="model.ckpt"):
        register_dataset(uri, record)
    assert not (tmp_path / "job" / "mlflow.db").exists()  # refused before MLflow was touched


RACER = """
import json, sys, time
from pathlib import Path
from pipeline.registry.register import register_dataset
uri, records, go = sys.argv[1], json.load(open(sys.argv[2])), Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
for r in records:
    print(json.dumps(register_dataset(uri, r)), flush=True)
"""


def test_an_alias_written_concurrently_is_read_again_not_an_error(tmp_path, monkeypatch):
    """Two registrations setting the alias at the same instant: the SQL store rejects the second insert
    (seen once in CI through a server). Planted here, since the real one needs a lucky interleaving."""
    from mlflow.exceptions import MlflowException

    uri = store.default_uri(tmp_path / "job")
    store.check_server(uri)
    ds, name = "sim-alias-race-v0", "invdyn-sim-alias-race-v0"
    register_dataset(uri, model_record(tmp_path, ds, 1, 0.5))
    register_dataset(uri, model_record(tmp_path, ds, 2, 0.3))
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias(name, "champion", "1")  # stale: version 2 is better
    real, calls = MlflowClient.set_registered_model_alias, []

    def conflict_once(self, *args):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name"
            )
        return real(self, *args)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", conflict_once)
    assert settle_champion(client, name) == "2"
    assert len(calls) == 2 and _champion(uri, name) == "2"
    real(client, name, "champion", "1")  # stale again; now every write fails for another reason

    def refused(self, *args):
        raise MlflowException("permission denied")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refused)
    with pytest.raises(MlflowException, match="permission denied"):  # any other error still fails
        settle_champion(client, name)


@pytest.mark.parametrize("kind", ["server", "sqlite"])
def test_concurrent_registrations_leave_champion_on_the_best(kind, request, tmp_path):
    uri = request.getfixturevalue("server").uri if kind == "server" else store.default_uri(tmp_path / "job")
    ds = f"sim-race-{kind}-v0"
    plans = {"a": [(1, 0.50), (2, 0.20), (3, 0.45)], "b": [(4, 0.40), (5, 0.30), (6, 0.25)]}
    go = tmp_path / "go"
    procs = []
    for who, plan in plans.items():
        file = tmp_path / f"{who}.json"
        file.write_text(json.dumps([model_record(tmp_path, ds, seed, mse) for seed, mse in plan]))
        cmd = [sys.executable, "-c", RACER, uri, str(file), str(go)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for p in procs:  # both imported and waiting: then they go at once
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
    go.touch()
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    name = store.model_name(ds)
    versions = _versions(uri, name)
    assert len(versions) == 6
    best = min(versions.values(), key=lambda v: float(v.tags["heldout_mse"]))
    assert float(best.tags["heldout_mse"]) == 0.20
    assert _champion(uri, name) == str(best.version)


def test_server_down_retry_then_register_from_storage(server, tmp_path):
    """Server stopped before registration: a clear error naming the recovery command; a registration
    already retrying survives the (short) outage; `python -m pipeline.register --from-storage` finishes the
    rest."""
    job = tmp_path / "job"
    records = [model_record(job, "sim-a-v0", 1, 0.3), model_record(job, "sim-b-v0", 2, 0.4)]
    records[1]["model_dir"] = str(Path(records[1]["model_dir"]).relative_to(job))  # relative paths work too
    records.append({"dataset": "sim-broken-v0", "error": "dataset failed to load"})
    (job / "summary.json").write_text(json.dumps(records))
    cli = [
        sys.executable,
        "-m",
        "pipeline.registry.register",
        "--from-storage",
        str(job),
        "--mlflow-uri",
        server.uri,
    ]
    retried = model_record(tmp_path, "sim-outage-v0", 3, 0.2)
    result, errors = {}, []

    def register():
        try:
            result.update(register_dataset(server.uri, retried, attempts=12))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=register)
    server.stop()
    try:
        with pytest.raises(store.TrackingError, match=r"pipeline\.register --from-storage"):
            register_dataset(server.uri, records[0], attempts=1)
        thread.start()
        down = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert down.returncode == 2 and server.uri in down.stderr and "mlflow server" in down.stderr
        assert thread.is_alive() and not result  # still failing and backing off
    finally:
        server.start()
    thread.join(timeout=240)
    assert not errors, errors
    assert result["champion"] and result["version"] == "1"
    up = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert "sim-broken-v0" in up.stdout and "skipped" in up.stdout
    for ds in ("sim-a-v0", "sim-b-v0"):
        assert _champion(server.uri, store.model_name(ds)) == "1"
    # idempotent: a second run registers nothing new
    again = register_from_storage(job, server.uri)
    assert [r["status"] for r in again] == ["present", "present", "skipped"]
    assert list(_versions(server.uri, store.model_name("sim-a-v0"))) == ["1"]


def test_register_cli_checks_its_arguments_first(tmp_path, monkeypatch, capsys):
    from pipeline.registry.register import main as register_main

    monkeypatch.chdir(tmp_path)  # no store here: the version is refused before the store is looked for
    assert register_main(["--promote", "sim-hopper-random-v0", "latest"]) == 2
    assert "the version is a number" in capsys.readouterr().err
    assert register_main(["--promote", "sim-hopper-random-v0", "1", "--alias", "best one"]) == 2
    assert "not a valid MLflow alias" in capsys.readouterr().err
    assert not (tmp_path / "invdyn-out").exists()
