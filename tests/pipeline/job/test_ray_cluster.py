"""The job on real Ray clusters: `ray start --head` + `ray job submit` with token authentication, and a
two-node cluster on this machine whose trials land on both nodes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.job import CHEETAH, HOPPER, job_env
from helpers.paths import REPO

from pipeline.job import pretrain_all

pytestmark = pytest.mark.slow
RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group we started (`ray start --block` stops its cluster), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout} s")


@pytest.mark.timeout(600)
def test_ray_job_submit_with_token_auth(sim_files, tmp_path):
    env = job_env(tmp_path, RAY_AUTH_MODE="token")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # The README's steps: a token, a head node with the dashboard on 127.0.0.1, then `ray job submit`.
    token = subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, check=True
    )
    token = token.stdout.strip()
    assert token and (Path(env["HOME"]) / ".ray" / "auth_token").is_file()
    dash = free_port()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--port",
            str(free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--include-dashboard",
            "true",
            "--num-cpus",
            "2",
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--disable-usage-stats",
        ],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    try:
        wait_for_dashboard(url, token, head)
        # Without the token the dashboard refuses the client: authentication is really on.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=5)
        assert e.value.code == 401
        submit = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                url,
                "--working-dir",
                str(REPO),
                "--",
                "python",
                "-m",
                "pipeline.job.pretrain_all",
                "--datasets",
                str(sim_files[HOPPER]),
                "--max-epochs",
                "2",
                "--no-mlflow",
                "--verbose",
                "0",
                "--out",
                str(out),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=540,
        )
        print(submit.stdout[-5000:], submit.stderr[-3000:], sep="\n")
        assert submit.returncode == 0
        assert "succeeded" in submit.stdout
    finally:
        stop_group(head)
    [record] = json.loads((out / "summary.json").read_text())
    assert record["status"] == "ok" and record["dataset"] == HOPPER
    assert Path(record["model_dir"], "params.json").is_file()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("executor", ["local", "train"])
def test_multi_node_cluster_runs_trials_on_both_nodes(sim_files, tmp_path, monkeypatch, executor):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    storage = tmp_path / "shared-storage"  # one file system for both "nodes" stands in for NFS / S3
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    try:
        code = pretrain_all.main(
            [
                "--datasets",
                f"{sim_files[CHEETAH]},{sim_files[HOPPER]}",
                "--max-epochs",
                "2",
                "--no-mlflow",
                "--verbose",
                "0",
                "--storage-path",
                str(storage),
                "--out",
                str(out),
                "--executor",
                executor,
            ]
        )
    finally:
        cluster.shutdown()
    assert code == 0
    entries = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
    assert len(entries) == 2
    assert len({e["node_id"] for e in entries}) == 2, "both trials ran on one node"
    # the models came through Ray to the driver's DIR/trial-models/, the storage path holds Tune's state only
    assert all(Path(e["checkpoint_path"]) == out / "trial-models" / e["key"] for e in entries)
    assert not [p for p in storage.rglob("model.*") if p.suffix in (".safetensors", ".ckpt")]
    job = json.loads((out / "job.json").read_text())
    assert (
        job["placement"]["nodes"] == 2
        and job["placement"]["slots"] == 2
        and job["placement"]["max_concurrent"] == 2
    )
