"""`python -m pipeline.pretrain_all` end to end on a real local Ray (no mocks): two simulated datasets with a
small search, a broken dataset, an injected crash, a SIGKILLed driver resumed with --resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.job import CHEETAH, HOPPER, job_env, run_job
from helpers.paths import REPO

import invdyn
from pipeline.job.placement import PlacementError, decide
from pipeline.training.search import SearchSpaceError, grid_points, parse_space, trial_key


def broken_file(path: Path) -> Path:
    """A D4RL-layout file with no `actions`: a dataset that cannot be prepared."""
    import h5py

    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((50, 11), np.float32)
        f["terminals"] = np.zeros(50, bool)
    return path


@pytest.fixture(scope="module")
def job(sim_files, tmp_path_factory):
    """One job: 2 datasets x 2 hidden sizes + a broken dataset; the first attempt of a hopper trial
    crashes."""
    root = tmp_path_factory.mktemp("job")
    out = root / "out"
    datasets = [str(sim_files[CHEETAH]), str(sim_files[HOPPER]), str(broken_file(root / "broken.hdf5"))]
    env = job_env(root, INVDYN_TEST_CRASH_ONCE=HOPPER)
    proc = run_job(
        [
            "--datasets",
            ",".join(datasets),
            "--search-space",
            '{"hidden_dim": [32, 64]}',
            "--max-epochs",
            "2",
            "--out",
            str(out),
            "--report",
            str(root / "report"),
        ],
        env,
    )
    summary = json.loads((out / "summary.json").read_text())
    return {
        "proc": proc,
        "out": out,
        "summary": {r["dataset"]: r for r in summary},
        "records": summary,
        "report": root / "report",
    }


def ledger(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*.json"))]


@pytest.mark.slow
def test_two_datasets_complete_and_best_per_dataset_loads(job):
    summary = job["summary"]
    entries = ledger(job["out"])
    for name in (CHEETAH, HOPPER):
        rec = summary[name]
        assert rec["status"] == "ok", rec
        mine = [e for e in entries if e["dataset"] == name]
        assert len(mine) == 2 and {e["config"]["hidden_dim"] for e in mine} == {32, 64}
        best = min(mine, key=lambda e: e["heldout_mse"])
        assert rec["heldout_mse"] == best["heldout_mse"] and rec["trial_id"] == best["trial_id"]
        assert rec["config"]["hidden_dim"] == best["config"]["hidden_dim"]
        assert rec["heldout_mse"] < rec["baseline_mse"]
        # evaluated by default (the selected model only), into its card and the registered version's tags
        assert rec["selected_by"] == "heldout_mse" and len(rec["candidates"]) == 1
        # ... on its test episodes: the trainer's own test figure, not the validation one that chose it
        assert rec["evaluation"]["part"] == "test"
        assert rec["evaluation"]["heldout_mse"] == pytest.approx(rec["test_mse"], rel=1e-4)
        assert "eval.heldout_mse" in rec["registration"]["eval_tags"]
        for key in (
            "dataset",
            "heldout_mse",
            "baseline_mse",
            "config",
            "model_dir",
            "epochs",
            "wall_s",
            "trial_id",
        ):
            assert key in rec
        assert Path(rec["model_dir"]).parent == job["out"] / "models"
        model = invdyn.load(name, source=rec["model_dir"])
        obs = np.zeros((4, model.obs_dim), np.float32)
        assert model.predict(obs, obs).shape == (4, model.act_dim)
        assert model.params["config"]["hidden_dim"] == rec["config"]["hidden_dim"]
        curves = json.loads(Path(rec["curves"]).read_text())
        assert len(curves) == 2 and all(len(c["curve"]) >= 1 for c in curves.values())
    # The default executor trains in the Tune trial's process, which Tune reuses: no process per trial.
    assert len({(e["node_id"], e["pid"]) for e in entries}) < len(entries)
    md = (job["out"] / "summary.md").read_text()
    assert CHEETAH in md and HOPPER in md and "| failed" in md
    assert summary[CHEETAH]["registration"]["champion"] is True  # the default SQLite MLflow store


@pytest.mark.slow
def test_injected_crash_is_retried_and_the_job_succeeds(job):
    marker = job["out"] / f".crash-once-{HOPPER}"
    assert marker.exists(), "the crash hook never fired"
    assert job["summary"][HOPPER]["status"] == "ok"
    assert job["summary"][HOPPER]["trials_finished"] == 2
    assert json.loads((job["out"] / "job.json").read_text())["last_run"]["failed"] == 0


@pytest.mark.slow
def test_train_executor_retries_a_crashed_train_worker(sim_files, tmp_path):
    """`--executor train`: each trial's TorchTrainer has a Train worker process of its own; its crash (the
    worker process exits hard) is retried and the model reaches the driver and the summary."""
    out = tmp_path / "out"
    proc = run_job(
        [
            "--datasets",
            str(sim_files[HOPPER]),
            "--search-space",
            '{"hidden_dim": [32]}',
            "--max-epochs",
            "2",
            "--executor",
            "train",
            "--no-mlflow",
            "--no-evaluate",
            "--out",
            str(out),
        ],
        job_env(tmp_path, INVDYN_TEST_CRASH_ONCE=HOPPER),
    )
    assert proc.returncode == 0
    assert (out / f".crash-once-{HOPPER}").exists(), "the crash hook never fired"
    [entry] = ledger(out)
    assert entry["status"] == "finished" and entry["worker_entered_at"] >= entry["trial_entered_at"]
    assert Path(entry["checkpoint_path"]) == out / "trial-models" / entry["key"]  # received, not on storage
    state = json.loads((out / "job.json").read_text())
    assert state["executor"] == "train" and state["last_run"]["failed"] == 0
    [rec] = json.loads((out / "summary.json").read_text())
    assert (
        rec["status"] == "ok" and invdyn.read_model_dir(rec["model_dir"]).params["config"]["hidden_dim"] == 32
    )


@pytest.mark.slow
def test_report_flag_writes_the_quality_report_of_the_chosen_models(job):
    md = (job["report"] / "report.md").read_text()
    for name in (CHEETAH, HOPPER):
        row = re.search(rf"^\| {name} \| action MSE \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", md, re.M)
        assert row, f"no action MSE row for {name} in the report"
        champion, recipe, baseline = (float(v) for v in row.groups())  # the recipe was trained too
        # the report scores the test episodes: the trainer's own test figure, not the validation one
        assert champion == pytest.approx(job["summary"][name]["test_mse"], rel=1e-2) and champion < baseline
    assert "broken.hdf5" in md  # the failed dataset is listed, not evaluated
    assert all((job["report"] / png).stat().st_size > 0 for png in ("learning_curves.png", "heldout_mse.png"))


@pytest.mark.slow
def test_broken_dataset_fails_alone_with_its_reason(job):
    failed = [r for r in job["records"] if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["dataset"].endswith("broken.hdf5")
    assert "broken.hdf5" in failed[0]["error"] and "actions" in failed[0]["error"]
    assert job["proc"].returncode == 1  # a failed dataset makes the job fail, after the others finished
    assert "broken.hdf5" in job["proc"].stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_driver_resumes_without_redoing_finished_trials(sim_files, tmp_path):
    out = tmp_path / "out"
    env = job_env(tmp_path)
    # Trials run longest first (61, 60, then 2 epochs; no early stop): the kill lands between the first and
    # the second finishing however slowly this machine runs (the ledger file appears within ~0.2 s of the
    # first).
    space = '{"max_epochs": [2, 60, 61], "patience": [1000], "hidden_dim": [256]}'
    args = [
        "--datasets",
        str(sim_files[HOPPER]),
        "--search-space",
        space,
        "--max-concurrent",
        "1",
        "--no-mlflow",
        "--out",
        str(out),
    ]
    cmd = [sys.executable, "-m", "pipeline.job.pretrain_all", "--verbose", "0", *args]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not list((out / "trials").glob("*.json")):
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a crash, no clean-up
        proc.wait()
    first = ledger(out)
    assert len(first) == 1, "the driver was killed after its first trial finished"
    assert not (out / "summary.json").exists()
    job_name = json.loads((out / "job.json").read_text())["job"]

    again = run_job([*args, "--resume"], env)
    assert again.returncode == 0
    after = ledger(out)
    assert len(after) == 3
    kept = next(e for e in after if e["key"] == first[0]["key"])
    assert kept["trial_id"] == first[0]["trial_id"] and kept["finished_at"] == first[0]["finished_at"]
    state = json.loads((out / "job.json").read_text())
    assert state["job"] == job_name and state["runs"] == 2  # the same job, run a second time
    assert (state["last_run"]["skipped"], state["last_run"]["ran"]) == (1, 2)
    rec = json.loads((out / "summary.json").read_text())[0]
    assert rec["trials_finished"] == 3 and rec["heldout_mse"] == min(e["heldout_mse"] for e in after)


# ---------------------------------------------------------------------- placement and search (no Ray)


def test_placement_never_reserves_more_than_the_cluster_has():
    # Trials that do not fit are started to wait (a node that joins takes them); 2 train at once.
    p = decide(9, totals=(2.0, 0.0, 1))
    assert (p.cpus, p.gpus, p.slots, p.training_slots, p.max_concurrent, p.threads) == (1.0, 0.0, 2, 2, 9, 1)
    assert decide(40, totals=(2.0, 0.0, 1)).max_concurrent == 16
    assert decide(40, totals=(64.0, 0.0, 4)).max_concurrent == 40  # a big cluster: as many as fit
    p = decide(9, cpus_per_trial=2, totals=(2.0, 0.0, 1))
    assert (p.slots, p.max_concurrent, p.threads) == (1, 9, 2)
    p = decide(9, totals=(2.0, 0.0, 1), start_ahead=True)  # TorchTrainer trials: one starts up ahead
    assert (p.slots, p.max_concurrent, p.worker_resources()) == (2, 3, {"CPU": 1.0})
    assert (
        decide(40, totals=(16.0, 0.0, 2), start_ahead=True).max_concurrent,
        decide(2, totals=(16.0, 0.0, 2), start_ahead=True).max_concurrent,
        decide(9, max_concurrent=2, totals=(2.0, 0.0, 1), start_ahead=True).max_concurrent,
    ) == (20, 2, 2)
    p = decide(20, totals=(16.0, 2.0, 2))  # GPUs: a quarter GPU per trial by default
    assert (p.gpus, p.slots, p.max_concurrent) == (0.25, 8, 16)
    assert p.worker_resources() == {"CPU": 1.0, "GPU": 0.25}
    p = decide(3, gpus_per_trial=1, totals=(4.0, 0.0, 1))  # autoscaling: nothing fits yet, all trials wait
    assert p.max_concurrent == 3
    with pytest.raises(PlacementError, match="--cpus-per-trial"):
        decide(1, cpus_per_trial=0, totals=(2.0, 0.0, 1))
    with pytest.raises(PlacementError, match="--gpus-per-trial"):
        decide(1, gpus_per_trial=1.5, totals=(2.0, 1.0, 1))


def test_trials_are_ordered_longest_first():
    from pipeline.job.records import PreparedDataset
    from pipeline.job.trials import make_trials
    from pipeline.training.config import TrainConfig

    info = {"obs_dim": 11, "act_dim": 3}
    ready = {
        "small": PreparedDataset("small", "small", "a", {**info, "transitions": 1000}),
        "big": PreparedDataset("big", "big", "b", {**info, "transitions": 9000}),
    }
    trials = make_trials(ready, grid_points({"hidden_dim": [256, 1024]}), TrainConfig(max_epochs=5))
    order = [(t.dataset, t.train["hidden_dim"]) for t in trials]
    assert order == [("big", 1024), ("small", 1024), ("big", 256), ("small", 256)]
    assert all(t.train["max_epochs"] == 5 and "device" not in t.train for t in trials)
    assert len({t.key for t in trials}) == 4


def test_search_space_and_trial_keys():
    assert parse_space(None, search=False) == {}
    assert len(grid_points(parse_space(None, search=True))) == 9
    assert grid_points({}) == [{}]
    assert grid_points(parse_space('{"lr": [0.001, 0.0003], "hidden_dim": [64]}', search=False)) == [
        {"hidden_dim": 64, "lr": 0.001},
        {"hidden_dim": 64, "lr": 0.0003},
    ]
    with pytest.raises(SearchSpaceError, match="hiden_dim"):
        parse_space('{"hiden_dim": [1]}', search=False)
    with pytest.raises(SearchSpaceError, match="JSON"):
        parse_space("{hidden_dim: 1}", search=False)
    k = trial_key("d", "abc", {"hidden_dim": 64, "lr": 1e-3})
    assert k == trial_key("d", "abc", {"lr": 1e-3, "hidden_dim": 64})
    assert k != trial_key("d", "abd", {"hidden_dim": 64, "lr": 1e-3})
