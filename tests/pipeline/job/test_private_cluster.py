"""The job on a Ray cluster whose nodes share no file system, on this machine: a head and worker nodes, each
in a mount namespace of its own, the workers with a tmpfs over the jobs' folders, the datasets, their HOME and
Ray's temp dir (tests/helpers/ray_nodes.py), so what a worker writes there the head never sees, as on two
machines. Needs root and util-linux (CI has both); without them the module fails, naming why, unless it is
deselected. Each trial gets 1 CPU and each node has 1, so the trials use every node.

- the README's `ray job submit`, with the default storage path and MLflow store (DIR/mlflow.db), the
  evaluation, the registry and the bundle: every finished trial's model reaches the driver through Ray
  (0 lost);
- a node joining while the job runs takes a trial beside the two running, then a worker node killed in the
  middle of a trial: that trial runs again elsewhere, the trials the dead node had finished are kept;
- the driver killed, then the whole cluster restarted: `--resume` redoes no finished trial of either node, and
  registers and exports every dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.job import CHEETAH, HOPPER, job_env
from helpers.paths import REPO
from helpers.ray_nodes import RAY, Cluster, Node, namespaces_available

import invdyn
from invdyn.bundle import bundle_models

pytestmark = pytest.mark.slow

#: the head's GCS declares a node dead after 5 missed 1 s health checks (Ray's default: 5 x 3 s)
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
#: the evaluation of each selected model, small (its MuJoCo tasks run on either node all the same)
SMALL_EVAL = ["--eval-starts", "16", "--eval-samples", "200", "--eval-closed-loop-episodes", "0"]


class Rig:
    """The cluster of this module: a 1-CPU head and one 1-CPU worker with private folders (restartable)."""

    def __init__(self, root: Path, datasets: Path):
        self.root, self.datasets = root, datasets
        self.jobs = root / "jobs"  # every job's DIR, storage path and MLflow store: private to the worker
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.starts = 0
        self.cluster: Cluster | None = None

    def start(self) -> None:
        self.starts += 1
        env = job_env(self.root / "node-env")
        self.cluster = Cluster(self.root / f"cluster{self.starts}", env)
        self.cluster.start_head(1, env=FAST_NODE_DEATH)
        self.add_worker()

    def add_worker(self, *, wait: bool = True) -> Node:
        return self.cluster.add_worker(1, [self.jobs, self.datasets], wait=wait)

    def reset(self) -> tuple[Node, str, str]:
        """Head + exactly one alive worker: (that worker, the head's node id, the worker's node id)."""
        alive = [w for w in self.cluster.workers if w.alive]
        for extra in alive[1:]:
            extra.stop()
        worker = alive[0] if alive else self.add_worker()
        return worker, self.cluster.node_id_of(self.cluster.head), self.cluster.wait_for(worker)

    def restart(self) -> None:
        self.cluster.stop()
        self.start()

    def client_env(self, root: Path, **extra) -> dict:
        """A job's environment: its own HOME and caches, the cluster's address and token."""
        return {**job_env(root), **self.cluster.env, "RAY_ADDRESS": self.cluster.address, **extra}


@pytest.fixture(scope="module")
def rig(tmp_path_factory, sim_files):
    why = namespaces_available()
    if why:  # never a silent skip: deselect it (`-m "not slow"` or `--deselect`) to run without it
        pytest.fail(f"{why}; deselect this module to run without it", pytrace=False)
    datasets = Path(sim_files[CHEETAH]).parent
    assert Path(sim_files[HOPPER]).parent == datasets
    rig = Rig(tmp_path_factory.mktemp("private-cluster"), datasets)
    try:
        rig.start()
        yield rig
    finally:
        if rig.cluster is not None:
            rig.cluster.stop()


def both(sim_files) -> str:
    return f"{sim_files[CHEETAH]},{sim_files[HOPPER]}"


def ledger(out: Path) -> dict[str, dict]:
    entries = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*.json"))]
    return {e["key"]: e for e in entries}


def start_driver(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`python -m pipeline.pretrain_all` joining the cluster ($RAY_ADDRESS), in a process group of its own."""
    cmd = [sys.executable, "-m", "pipeline.pretrain_all", "--verbose", "0", *args]
    with open(log, "w") as sink:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_driver(job: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def wait_until(what: str, check, job: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert job.poll() is None, f"the job ended before {what}: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"never {what} in {timeout} s: {log.read_text()[-4000:]}"
        time.sleep(0.1)


def model_files(root: Path) -> list[Path]:
    return (
        [p for p in root.rglob("model.*") if p.suffix in (".safetensors", ".ckpt")] if root.exists() else []
    )


def test_ray_job_submit_on_nodes_that_share_no_files(rig, sim_files):
    """The README's `ray start` + `ray job submit` path with the default --storage-path (DIR/ray, on the head
    only) and MLflow store (DIR/mlflow.db): both trials, one per node, are logged, evaluated, registered and
    exported; the worker keeps no model of its own."""
    worker, head_id, worker_id = rig.reset()
    marker = rig.jobs / "written-by-the-worker"  # the set-up itself: the worker's files are its own
    worker.sees(marker).write_text("only the worker sees this")
    assert not marker.exists() and worker.sees(marker).exists()
    here = rig.jobs / "submit"
    out, bundle = here / "out", here / "invdyn-bundle.zip"
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            rig.cluster.dashboard,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "-m",
            "pipeline.pretrain_all",
            "--datasets",
            both(sim_files),
            "--max-epochs",
            "2",
            *SMALL_EVAL,
            "--export",
            str(bundle),
            "--out",
            str(out),
        ],
        env=rig.client_env(here),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=480,
    )
    print(submit.stdout[-6000:], submit.stderr[-3000:], sep="\n")
    assert submit.returncode == 0 and "succeeded" in submit.stdout
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.invdyn_kind = 'trial'"
    )
    # the driver logged each trial's model, the worker's too, from the copy it received
    assert len(runs) == 2 and all(r.data.tags.get("weights_sha256") for r in runs)
    versions = {
        name: client.get_model_version_by_alias(f"invdyn-{name}", "champion") for name in (CHEETAH, HOPPER)
    }
    entries = ledger(out)
    assert len(entries) == 2
    assert {e["node_id"] for e in entries.values()} == {head_id, worker_id}, (
        "the trials did not use both nodes"
    )
    for e in entries.values():
        assert Path(e["checkpoint_path"]) == out / "trial-models" / e["key"]
        invdyn.read_model_dir(e["checkpoint_path"])
    job = json.loads((out / "job.json").read_text())
    assert job["storage_path"] == str(out / "ray") and job["placement"]["nodes"] == 2
    assert job["last_run"]["failed"] == 0 and job["last_run"]["retried"] == []
    summary = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    for name in (CHEETAH, HOPPER):
        rec = summary[name]
        assert rec["status"] == "ok" and rec["registration"]["champion"] is True
        assert str(rec["registration"]["version"]) == str(versions[name].version)
        # the evaluation tasks ran where Ray put them, with the model's bytes, not a head-only path
        assert rec.get("evaluation") and not rec.get("evaluation_error")
    assert sorted(bundle_models(bundle)) == sorted([CHEETAH, HOPPER])
    manifest = invdyn.extract_bundle(bundle, here / "extracted")  # every checksum verified
    assert manifest
    model = invdyn.load(HOPPER, source=here / "extracted" / HOPPER)
    assert model.obs_dim == 11
    assert model_files(out / "ray") == [], "a model went to the storage path"
    assert model_files(worker.sees(out)) == [], "the worker kept a model of its own"


class Gates:
    """The barrier hook as a gate per node: its folder is under the job's private folders, so each node has
    its own (reached through the node's mount namespace); with `parties` never met by trials alone, a trial
    entering its training function waits there until the test opens that node's gate."""

    PARTIES = 50

    def __init__(self, folder: Path):
        self.folder = folder

    def hook(self) -> str:
        return json.dumps({"parties": self.PARTIES, "folder": str(self.folder), "timeout_s": 150})

    def on(self, node: Node) -> Path:
        return self.folder if node.name == "head" else node.sees(self.folder)

    def inside(self, node: Node) -> list[str]:
        """The keys of the trials waiting or training on `node` (barrier files are named key-pid)."""
        where = self.on(node)
        names = [p.name for p in where.iterdir()] if where.is_dir() else []
        return [n.rsplit("-", 1)[0] for n in names if not n.startswith("gate-")]

    def open(self, node: Node) -> None:
        where = self.on(node)
        where.mkdir(parents=True, exist_ok=True)
        for i in range(self.PARTIES):
            (where / f"gate-{i}").touch()

    def close(self, node: Node) -> None:
        for i in range(self.PARTIES):
            (self.on(node) / f"gate-{i}").unlink(missing_ok=True)


def test_a_joining_node_takes_trials_and_a_killed_one_costs_only_its_running_trial(rig, sim_files):
    """Six trials on a 1-CPU head and a 1-CPU worker (room for 2 at once), each held at the start of its
    training function until the test opens its node's gate (Gates). While the first two wait, a second worker
    joins and takes a third trial. The first worker is let through one trial, then, held inside its second,
    every process of that node is SIGKILLed (a lost machine); then the other nodes' gates open for good."""
    worker, head_id, worker_id = rig.reset()
    head = rig.cluster.head
    here = rig.jobs / "killed-worker"
    out, log = here / "out", here / "job.log"
    here.mkdir(parents=True)
    gates = Gates(here / "barrier")
    env = rig.client_env(here, INVDYN_TEST_TRIAL_BARRIER=gates.hook())
    args = ["--datasets", both(sim_files), "--search-space", '{"hidden_dim": [32, 48, 64]}']
    args += ["--max-epochs", "2", "--no-mlflow", "--no-evaluate", "--max-failures", "2", "--out", str(out)]
    job = start_driver(args, env, log)
    try:
        wait_until("a trial on each node", lambda: gates.inside(head) and gates.inside(worker), job, log)
        joined = rig.add_worker()  # a node that joins while the job runs
        joined_id = rig.cluster.wait_for(joined)
        wait_until("the joined node took a trial", lambda: gates.inside(joined), job, log, timeout=150)
        assert len(gates.inside(head)) == len(gates.inside(worker)) == 1  # 3 trials at once, one per node
        # the worker finishes one trial (its gate closes again as soon as that one has trained)
        [first] = gates.inside(worker)
        gates.open(worker)
        wait_until("the worker trained a trial", lambda: first not in gates.inside(worker), job, log)
        gates.close(worker)
        wait_until("the worker's trial finished", lambda: first in ledger(out), job, log)
        while True:  # then it is held inside its next one (a trial that slipped through is let go)
            [held] = wait_until("the worker's next trial", lambda: gates.inside(worker), job, log)
            time.sleep(0.5)
            if held in gates.inside(worker):
                break
        finished_there = {k for k, e in ledger(out).items() if e["node_id"] == worker_id}
        killed_at = time.time()
        worker.kill()
        gates.open(head)
        gates.open(joined)
        rc = job.wait(300)
    finally:
        if job.poll() is None:
            kill_driver(job)
    text = log.read_text()
    print(text[-5000:])
    assert rc == 0, text[-4000:]
    entries = ledger(out)
    assert len(entries) == 6 and all(e["status"] == "finished" for e in entries.values())
    # the job started with room for 2 at once, and the node that joined took trials beside them
    assert json.loads((out / "job.json").read_text())["placement"]["slots"] == 2
    assert any(e["node_id"] == joined_id for e in entries.values()), "the node that joined took no trial"
    # the trials the dead node had finished are kept as they were, their models on the head
    assert first in finished_there and held not in finished_there
    for key in finished_there:
        assert entries[key]["node_id"] == worker_id and entries[key]["finished_at"] < killed_at
        invdyn.read_model_dir(entries[key]["checkpoint_path"])
    # the killed trial, and only it, ran again on another node
    assert entries[held]["node_id"] in (head_id, joined_id)
    assert not [k for k, e in entries.items() if e["node_id"] == worker_id and k not in finished_there]
    last = json.loads((out / "job.json").read_text())["last_run"]
    assert [(r["key"], r["node_id"]) for r in last["retried"]] == [(held, worker_id)] and last["failed"] == 0
    assert f"failed on node {worker_id}" in text and "retrying" in text  # the lost node, named
    summary = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    [retry] = summary[entries[held]["dataset"]]["trial_retries"]
    assert (retry["key"], retry["node_id"]) == (held, worker_id) and retry["error"]
    assert all(r["status"] == "ok" and r["trials_finished"] == 3 for r in summary.values())
    print("retried:", json.dumps(last["retried"], indent=1))


def test_killed_driver_and_restarted_cluster_resume_without_redoing_trials(rig, sim_files):
    """The default job (its SQLite MLflow store and storage path in DIR), 4 trials of 3 s: the driver is
    SIGKILLed once both nodes have finished a trial, then the whole cluster is stopped and a fresh one started
    (a head that restarts: no Ray state, the worker's files gone); `--resume` runs only the rest."""
    worker, head_id, worker_id = rig.reset()
    here = rig.jobs / "resume"
    out, bundle, log = here / "out", here / "bundle.zip", here / "job.log"
    here.mkdir(parents=True)
    hold = json.dumps({"parties": 99, "folder": str(here / "barrier"), "timeout_s": 3})
    args = ["--datasets", both(sim_files), "--search-space", '{"hidden_dim": [32, 48]}', "--max-epochs", "2"]
    args += [*SMALL_EVAL, "--export", str(bundle), "--out", str(out)]
    job = start_driver(args, rig.client_env(here, INVDYN_TEST_TRIAL_BARRIER=hold), log)
    try:

        def both_nodes_finished_one():
            entries = ledger(out)
            return entries if {e["node_id"] for e in entries.values()} == {head_id, worker_id} else None

        wait_until("both nodes finished a trial", both_nodes_finished_one, job, log)
    finally:
        kill_driver(job)
    before = ledger(out)
    assert 2 <= len(before) < 4, "the driver was not killed mid-job"
    rig.restart()
    again = subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain_all", "--verbose", "0", *args, "--resume"],
        cwd=REPO,
        env=rig.client_env(here),
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(again.stdout[-5000:], again.stderr[-3000:], sep="\n")
    assert again.returncode == 0
    assert f"{len(before)} already finished, {4 - len(before)} to run" in again.stdout
    after = ledger(out)
    assert len(after) == 4
    for key, e in before.items():  # not run again: the same trial, its same model
        assert (after[key]["trial_id"], after[key]["finished_at"]) == (e["trial_id"], e["finished_at"])
    new_nodes = {e["node_id"] for k, e in after.items() if k not in before}
    assert new_nodes and not new_nodes & {head_id, worker_id}  # the rest ran on the restarted cluster
    summary = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    for name in (CHEETAH, HOPPER):
        assert summary[name]["status"] == "ok" and summary[name]["trials_finished"] == 2
        assert summary[name]["registration"]["champion"] is True
    assert sorted(bundle_models(bundle)) == sorted([CHEETAH, HOPPER])
    invdyn.extract_bundle(bundle, here / "extracted")
