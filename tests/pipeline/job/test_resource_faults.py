"""Read-only and full storage under the dataset cache, the model cache, a training run's output and a bundle
export: each gives a StorageError (an InvdynError) that names the path, leaves no temp file, and the CLIs
print one `error:` line.

The faults are real where the machine allows it: a tmpfs mounted read-only, and a 1 MiB tmpfs that fills
up (needs root with CAP_SYS_ADMIN, as in this project's CI container). Elsewhere the same errno is raised
by the file-creating calls under that folder (os.open / os.mkdir / os.fsync), the one fault we then fake.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import write_d4rl_file
from helpers.models import FileServer, make_bundle, make_model_dir
from helpers.paths import REPO

import invdyn
from invdyn.errors import StorageError


def _try_mount(path: Path, opts: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, f"invdyn-test-{uuid.uuid4().hex[:6]}", str(path)],
        capture_output=True,
    )
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fake_errno_under(monkeypatch, root: Path, code: int) -> None:
    """Fallback: creating / writing files under `root` fails with `code` (the fault we cannot cause)."""
    root = str(root)
    real_open, real_mkdir, real_fsync = os.open, os.mkdir, os.fsync
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def under(p) -> bool:
        return os.path.abspath(os.fspath(p)).startswith(root)

    def fake_open(path, flags, *a, **kw):
        if flags & writes and under(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *a, **kw)

    def fake_mkdir(path, *a, **kw):
        if under(path) and not os.path.isdir(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    if code == errno.ENOSPC:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    else:
        monkeypatch.setattr(os, "fsync", real_fsync)


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A folder (with a file in it) on a read-only file system."""
    path = tmp_path / "ro"
    path.mkdir()
    if _try_mount(path, "size=4m,mode=0755"):
        (path / "existing.txt").write_text("x")
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
        _umount(path)
    else:
        (path / "existing.txt").write_text("x")
        _fake_errno_under(monkeypatch, path, errno.EROFS)
        yield path


@pytest.fixture
def full_dir(tmp_path, monkeypatch):
    """A folder on a 1 MiB file system: the first large write fills it."""
    path = tmp_path / "full"
    path.mkdir()
    if _try_mount(path, "size=1m,mode=0755"):
        yield path
        _umount(path)
    else:
        _fake_errno_under(monkeypatch, path, errno.ENOSPC)
        yield path


def _temps(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".fetch-" in p.name)


@pytest.mark.parametrize("fault", ["readonly", "full"])
def test_dataset_cache_on_bad_storage(request, tmp_path, monkeypatch, caplog, fault):
    """The Arrow cache is only a cache: loads still work (parsed each time), with a warning naming the
    path."""
    where = request.getfixturevalue(f"{fault}_dir")
    monkeypatch.setenv("INVDYN_HOME", str(where / "home"))
    if fault == "full":
        (where / "home").mkdir()
    data = tmp_path / "data.hdf5"
    write_d4rl_file(data, episodes=(20000, 20000), obs_dim=11, act_dim=3)  # ~4 MB of arrays: more than 1 MiB
    from pipeline.data.cli import main
    from pipeline.data.sources import load_transitions

    with caplog.at_level("WARNING"):
        t = load_transitions(str(data))
    assert len(t) == 40000 and t.stats.get("cache_hit") is not True
    assert f"cannot write the dataset cache {where}" in caplog.text
    assert ("read-only" if fault == "readonly" else "no space") in caplog.text.lower()
    assert main(["prepare", str(data)]) == 0
    assert _temps(where) == [] and not list(where.rglob("*.arrow"))


@pytest.mark.parametrize("fault", ["readonly", "full"])
def test_model_cache_on_bad_storage(request, tmp_path, monkeypatch, capsys, fault):
    where = request.getfixturevalue(f"{fault}_dir")
    monkeypatch.setenv("INVDYN_HOME", str(where / "home"))
    if fault == "full":
        (where / "home").mkdir()
    small = make_bundle(tmp_path, names=("a-v0",))
    big = invdyn.write_bundle(
        tmp_path / "big.zip", [make_model_dir(tmp_path / "big" / "b-v0", hidden_dim=700)]
    )
    with pytest.raises(StorageError, match=str(where)):
        invdyn.fetch(big if fault == "full" else small, progress=False)
    with FileServer(tmp_path) as server:  # and over HTTP (the download itself hits the fault)
        with pytest.raises(StorageError, match=str(where)):
            invdyn.fetch(server.url(big.name), progress=False)
        from invdyn.__main__ import main

        assert main(["fetch", server.url(big.name), "--quiet"]) == 1
    assert f"error: cannot write {where}" in capsys.readouterr().err
    assert _temps(where) == []


@pytest.mark.parametrize("fault", ["readonly", "full"])
def test_export_location_on_bad_storage(request, tmp_path, fault):
    where = request.getfixturevalue(f"{fault}_dir")
    dirs = [make_model_dir(tmp_path / "m" / f"m{i}-v0", hidden_dim=500, seed=i) for i in range(2)]
    with pytest.raises(StorageError, match=str(where / "bundle.zip")):
        invdyn.write_bundle(where / "bundle.zip", dirs)
    assert not (where / "bundle.zip").exists() and _temps(where) == []
    with pytest.raises(StorageError, match=str(where)):
        invdyn.extract_bundle(invdyn.write_bundle(tmp_path / "ok.zip", dirs), where / "extracted")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["readonly", "full"])
def test_training_output_on_bad_storage(request, tmp_path, fault):
    where = request.getfixturevalue(f"{fault}_dir")
    data = tmp_path / "data.hdf5"
    write_d4rl_file(data, episodes=(400, 300, 300), obs_dim=5, act_dim=2)
    out = where / "model"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.training.cli",
        "--dataset",
        str(data),
        "--out",
        str(out),
        "--max-epochs",
        "1",
        "--hidden-dim",
        "1024",
        "--batch-size",
        "64",
        "--quiet",
    ]
    if os.path.ismount(where):  # a real fault: the CLI as a user runs it
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        # checked before training: the folder the model directory would be made in
        assert f"error: cannot write {where}" in r.stderr and "Traceback" not in r.stderr
    else:
        from pipeline.training.cli import main

        assert main(cmd[3:]) == 2
    assert not out.exists() and _temps(where) == []


# ------------------------------------------------------------------ a Ray worker node killed mid-trial


def _busy_ray_workers(node) -> list[str]:
    """Titles of the Ray worker processes of `node` (children of its raylet) that run a trial right now: a
    Tune trial (ImplicitFunc, executor "local") or a Train controller / worker (executor "train")."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    titles = []
    for p in raylet.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if (
            title.startswith("ray::")
            and "IDLE" not in title
            and ("Train" in title or "ImplicitFunc" in title)
        ):
            titles.append(title)
    return titles


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_node_killed_mid_trial_is_retried_and_nothing_is_lost(sim_files, tmp_path):
    """Head (no CPUs for trials) + two 1-CPU worker nodes; the node running a trial is killed (its raylet and
    workers, as a lost instance) and a fresh node joins: Tune retries the trial, the job ends with every trial
    finished on a surviving node and every model loadable."""
    import json
    import time

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    out, storage = tmp_path / "out", tmp_path / "shared-storage"
    data = str(sim_files["sim-hopper-random-v0"])
    env = {
        **os.environ,
        "RAY_ADDRESS": cluster.address,
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "pipeline.job.pretrain_all",
        "--datasets",
        data,
        "--search-space",
        '{"hidden_dim": [32, 48]}',
        "--max-epochs",
        "60",
        "--patience",
        "60",
        "--batch-size",
        "256",
        "--no-mlflow",
        "--verbose",
        "0",
        "--max-failures",
        "3",
        "--storage-path",
        str(storage),
        "--out",
        str(out),
    ]
    log = tmp_path / "job.log"
    killed = None
    try:
        with open(log, "w") as sink:
            job = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        while killed is None:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial ever ran on a worker node"
            for node in nodes:
                if _busy_ray_workers(node):
                    killed = node
                    break
            time.sleep(0.2)
        killed_id = killed.node_id
        cluster.remove_node(killed, allow_graceful=False)  # SIGKILL: raylet, object store, trial workers
        cluster.add_node(num_cpus=1)  # the autoscaler's replacement instance
        rc = job.wait(300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        cluster.shutdown()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    entries = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
    assert sorted(e["config"]["hidden_dim"] for e in entries) == [32, 48]  # nothing lost
    assert all(e["status"] == "finished" and e["node_id"] != killed_id for e in entries)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["ok"]
    model = invdyn.read_model_dir(out / "models" / summary[0]["dataset"])
    assert model.params["config"]["hidden_dim"] in (32, 48)


# ------------------------------------------------------------------ the MLflow server restarted mid-job


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_mlflow_server_restarted_mid_job_records_every_trial(sim_files, tmp_path):
    """A real `mlflow server` is stopped and started again (same port and store) while trials run: the job
    completes, every trial has its finished MLflow run with metrics and model, the champion is registered.
    The job runs with MLflow / cloud credentials in its environment: none of them reaches MLflow, the job's
    output or the bundle (checked here, on the same real job, to keep the suite short)."""
    import time

    from helpers.mlflow_server import MlflowServer
    from mlflow.tracking import MlflowClient

    canary = "c4nary-S3CRET-mlflow"
    server = MlflowServer(tmp_path / "mlflow").start()
    out, bundle, log = tmp_path / "out", tmp_path / "bundle.zip", tmp_path / "job.log"
    datasets = str(sim_files["sim-hopper-random-v0"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_USERNAME="invdyn",
        MLFLOW_TRACKING_PASSWORD=canary,
        AWS_SECRET_ACCESS_KEY=canary,
        RAY_AUTH_TOKEN_UNUSED=canary,
        INVDYN_MLFLOW_RETRIES="8",
    )
    cmd = [
        sys.executable,
        "-m",
        "pipeline.job.pretrain_all",
        "--datasets",
        datasets,
        "--search-space",
        '{"hidden_dim": [32, 48]}',
        "--max-epochs",
        "15",
        "--batch-size",
        "256",
        "--num-cpus",
        "2",
        "--verbose",
        "0",
        "--mlflow-uri",
        server.uri,
        "--export",
        str(bundle),
        "--out",
        str(out),
    ]
    restarted = False
    try:
        with open(log, "w") as sink:
            job = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while not restarted:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished"
            if "[1/2 done" in log.read_text():  # one trial finished, the other still training
                server.restart()
                restarted = True
            time.sleep(0.2)
        rc = job.wait(400)
        text = log.read_text()
        assert rc == 0, text[-5000:]
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        trials = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
        assert len(trials) == 2
        runs = {
            r.data.tags.get("ray_trial_id"): r
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], "tags.invdyn_kind = 'trial'")
        }
        for t in trials:
            run = runs.get(t["trial_id"])
            assert run is not None, f"trial {t['trial_id']} has no MLflow run"
            assert run.info.status == "FINISHED" and "heldout_mse" in run.data.metrics
            assert client.list_artifacts(run.info.run_id, "model"), f"trial {t['trial_id']}: no model logged"
        assert client.get_model_version_by_alias("invdyn-sim-hopper-random-v0", "champion")
        # no secret anywhere: run params / tags, the job's log and outputs, the bundle
        for run in runs.values():
            assert canary not in json.dumps([run.data.params, run.data.tags])
        assert canary not in text
        assert [str(p) for p in out.rglob("*") if p.is_file() and canary.encode() in p.read_bytes()] == []
        assert canary.encode() not in bundle.read_bytes()
    finally:
        if "job" in locals() and job.poll() is None:
            job.kill()
            job.wait()
        server.stop()


@pytest.mark.parametrize("where", ["out", "storage"])
def test_job_output_or_storage_path_read_only_fails_before_training(readonly_dir, tmp_path, capsys, where):
    """pretrain_all checks its output folder and a local --storage-path before starting Ray or any trial."""
    from pipeline.job import pretrain_all

    out = readonly_dir / "out" if where == "out" else tmp_path / "out"
    storage = readonly_dir / "ray" if where == "storage" else tmp_path / "ray"
    code = pretrain_all.main(
        [
            "--datasets",
            "sim-hopper-random-v0",
            "--no-mlflow",
            "--out",
            str(out),
            "--storage-path",
            str(storage),
            "--verbose",
            "0",
        ]
    )
    assert code == 2
    bad = out if where == "out" else storage
    assert f"error: cannot write {bad}: the file system is read-only" in capsys.readouterr().err
    assert not (tmp_path / "out" / "trials").exists() and not list(
        Path(os.environ["D4RL_DATASET_DIR"]).iterdir()
    )
