"""Ray's GPU placement of the job's trials, on logical GPUs (a cluster told it has GPUs, on a machine without
CUDA): fractions share a GPU at once, whole GPUs take turns, two GPU nodes both take trials, and every
trial records the GPU Ray gave it and the device it really trained on (the CPU here, with one warning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.job import pretrain_all
from pipeline.job.trial_worker import BARRIER_ENV

pytestmark = pytest.mark.slow
FALLBACK = (
    "but CUDA is not available in this process (torch.cuda.is_available() is False); training on the CPU"
)


@pytest.fixture(scope="module")
def cluster():
    """One head node with 4 CPUs and 1 logical GPU (Ray schedules it like a real one)."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 1, "include_dashboard": False}
    )
    c.wait_for_nodes()
    yield c
    c.shutdown()


def run_job(cluster, monkeypatch, tmp_path, d4rl_file, seeds: int, *flags: str, barrier: dict) -> Path:
    """The job on `cluster` (via $RAY_ADDRESS, as under `ray job submit`): one tiny dataset, `seeds` search
    points; each trial waits in its training function until `barrier["parties"]` trials have entered it."""
    data, _ = d4rl_file(episodes=(60,) * 8, obs_dim=4, act_dim=2)
    out = tmp_path / "out"
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv(BARRIER_ENV, json.dumps({"folder": str(tmp_path / "barrier"), **barrier}))
    space = json.dumps({"seed": list(range(seeds)), "hidden_dim": [16]})
    args = ["--datasets", str(data), "--search-space", space, "--max-epochs", "1", "--batch-size", "32"]
    code = pretrain_all.main(
        [*args, "--no-mlflow", "--no-evaluate", "--verbose", "0", "--out", str(out), *flags]
    )
    assert code == 0
    return out


def trials(out: Path) -> list[dict]:
    """The ledger's entries, each with its model's params.json (from the storage path)."""
    entries = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
    for e in entries:
        if "members" not in e:  # a population's group: its members' models are inside its checkpoint
            e["params"] = json.loads((Path(e["checkpoint_path"]) / "params.json").read_text())
    return sorted(entries, key=lambda e: e.get("worker_entered_at") or 0)


def assert_trained_on_cpu_with_gpu(e: dict, gpu_ids: list) -> None:
    resolved = e["params"]["training"]["resolved"]
    assert resolved["ray_gpu_ids"] == e["ray_gpu_ids"] == gpu_ids
    assert resolved["device"] == e["device"] == "cpu" and resolved["requested_device"] == "cuda"
    assert FALLBACK in resolved["gpu_fallback"] and e["gpu_fallback"] == resolved["gpu_fallback"]


@pytest.mark.timeout(300)
def test_four_quarter_gpu_trials_share_one_gpu_at_once(cluster, monkeypatch, tmp_path, d4rl_file, capfd):
    flags = ("--gpus-per-trial", "0.25", "--no-population")  # a trial per search point
    out = run_job(cluster, monkeypatch, tmp_path, d4rl_file, 4, *flags, barrier={"parties": 4})
    entries = trials(out)
    assert len(entries) == 4
    for e in entries:
        assert_trained_on_cpu_with_gpu(e, [0])
    # All four were in their training function at once: the last entered before the first finished.
    assert max(e["worker_entered_at"] for e in entries) < min(e["worker_finished_at"] for e in entries)
    assert len({e["pid"] for e in entries}) == 4 and len({e["node_id"] for e in entries}) == 1
    job = json.loads((out / "job.json").read_text())
    assert (job["placement"]["gpus"], job["placement"]["cluster_gpus"], job["placement"]["slots"]) == (
        0.25,
        1.0,
        4,
    )
    assert job["population"] is False
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if FALLBACK in ln]
    assert len(warnings) == 4 and all(ln.startswith("warning: trial ") for ln in warnings)
    [record] = json.loads((out / "summary.json").read_text())
    chosen = json.loads((Path(record["model_dir"]) / "params.json").read_text())
    assert chosen["training"]["resolved"]["ray_gpu_ids"] == [0]


@pytest.mark.timeout(300)
def test_whole_gpu_trials_run_one_after_another(cluster, monkeypatch, tmp_path, d4rl_file):
    # Tune may start all four (--max-concurrent 4); Ray's one GPU admits one at a time. The barrier holds
    # a trial alone in its training function for 3 s, so any two running at once would overlap.
    flags = ("--gpus-per-trial", "1", "--max-concurrent", "4", "--no-population")
    out = run_job(
        cluster, monkeypatch, tmp_path, d4rl_file, 4, *flags, barrier={"parties": 2, "timeout_s": 3}
    )
    entries = trials(out)
    assert len(entries) == 4
    for e in entries:
        assert_trained_on_cpu_with_gpu(e, [0])
    for before, after in zip(entries, entries[1:], strict=False):
        assert before["worker_finished_at"] <= after["worker_entered_at"], "two whole-GPU trials overlapped"
    assert json.loads((out / "job.json").read_text())["placement"]["gpus"] == 1.0


@pytest.mark.timeout(300)
def test_two_gpu_nodes_both_take_trials(cluster, monkeypatch, tmp_path, d4rl_file):
    node = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    # executor "train": each trial's GPU is held by its own Train worker (whose process group is gloo:
    # Train's GPU default, NCCL, is not in a CPU build of torch)
    flags = ("--gpus-per-trial", "1", "--executor", "train", "--no-population")
    try:
        out = run_job(cluster, monkeypatch, tmp_path, d4rl_file, 2, *flags, barrier={"parties": 2})
    finally:
        cluster.remove_node(node)
    entries = trials(out)
    assert len({e["node_id"] for e in entries}) == 2, "both trials ran on one node"
    for e in entries:
        assert_trained_on_cpu_with_gpu(e, [0])  # each node's own GPU 0
    placement = json.loads((out / "job.json").read_text())["placement"]
    assert (placement["nodes"], placement["cluster_gpus"], placement["gpus"]) == (2, 2.0, 1.0)


@pytest.mark.timeout(300)
def test_trials_on_a_gpu_default_to_one_population_per_dataset(cluster, monkeypatch, tmp_path, d4rl_file):
    # executor "train": the population's Train worker holds the GPU and reports every member's model
    out = run_job(cluster, monkeypatch, tmp_path, d4rl_file, 3, "--executor", "train", barrier={"parties": 1})
    job = json.loads((out / "job.json").read_text())
    assert job["population"] is True and job["placement"]["gpus"] == 0.25  # the defaults on a GPU cluster
    entries = trials(out)  # a searched seed keeps the split: one shape group of three members, one trial
    assert len(entries) == 1 and len(entries[0]["members"]) == 3
    assert len({e["trial_id"] for e in entries}) == 1
    [record] = json.loads((out / "summary.json").read_text())
    assert record["population"] == 3 and len(record["candidates"]) == 3
    for c in record["candidates"]:
        member = next(m for e in entries for m in e["members"] if m["key"] == c["key"])
        params = json.loads((Path(member["checkpoint_path"]) / "params.json").read_text())
        assert params["training"]["resolved"]["ray_gpu_ids"] == member["ray_gpu_ids"] == [0]
        assert params["training"]["resolved"]["device"] == member["device"] == "cpu"
