"""`pretrain_all --population`: one trial per dataset trains its whole search as stacked models. The contract
(a ledger file per dataset and shape group, every search point among summary.json's candidates, "population":
K), a member run per search point in MLflow with its own curve, and a killed job resumed without redoing
the dataset that had finished; plus the bookkeeping without Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.job import CHEETAH, HOPPER, job_env, run_job
from helpers.paths import REPO

from pipeline.job import populations
from pipeline.job.outputs import Ledger, format_table
from pipeline.job.records import PopulationSpec, TrialResult, TrialSpec
from pipeline.job.selection import population_table

SPACE = {"hidden_dim": [16, 32], "lr": [0.001, 0.0003]}  # two shape groups of two members


def group_files(out: Path) -> dict[str, list[dict]]:
    """dataset -> its ledger files (one per shape group)."""
    found: dict[str, list[dict]] = {}
    for p in sorted((out / "trials").glob("*.json")):
        entry = json.loads(p.read_text())
        found.setdefault(entry["dataset"], []).append(entry)
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_population_job_contract_mlflow_runs_and_resume_after_a_kill(sim_files, tmp_path):
    out = tmp_path / "out"
    env = job_env(tmp_path)
    args = ["--datasets", f"{sim_files[CHEETAH]},{sim_files[HOPPER]}", "--search-space", json.dumps(SPACE)]
    args += ["--population", "--out", str(out), "--max-concurrent", "1"]  # one dataset after the other
    # equal work per dataset (no early stop): the kill lands while the second dataset trains
    args += ["--max-epochs", "12", "--patience", "1000", "--batch-size", "64"]
    args += ["--eval-horizon", "8", "--eval-starts", "4", "--eval-samples", "200"]
    cmd = [sys.executable, "-m", "pipeline.job.pretrain_all", "--verbose", "0", *args]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not list((out / "trials").glob("*.json")):
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.1)
        time.sleep(0.5)  # the first dataset's second group file follows its first at once
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a crash, no clean-up
        proc.wait()
    [(first, before)] = group_files(out).items()
    assert len(before) == 2, "the driver was killed after its first dataset finished"

    again = run_job([*args, "--resume"], env)
    assert again.returncode == 0
    after = group_files(out)
    # The contract: one ledger file per dataset and shape group; the finished dataset was not trained again.
    assert sorted(after) == sorted([CHEETAH, HOPPER]) and all(len(files) == 2 for files in after.values())
    assert sorted(after[first], key=lambda e: e["key"]) == sorted(before, key=lambda e: e["key"])
    job = json.loads((out / "job.json").read_text())
    assert job["population"] is True and job["runs"] == 2
    assert (job["last_run"]["skipped"], job["last_run"]["ran"]) == (4, 4)
    summary = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    members = {}
    for name, files in after.items():
        rec = summary[name]
        assert rec["status"] == "ok" and rec["population"] == 4
        members[name] = [m for f in files for m in f["members"]]
        assert {len(f["members"]) for f in files} == {2}
        assert {m["config"]["hidden_dim"] for m in files[0]["members"]} == {
            files[0]["members"][0]["config"]["hidden_dim"]
        }
        points = [(c["point"]["hidden_dim"], c["point"]["lr"]) for c in rec["candidates"]]
        assert sorted(points) == sorted((h, lr) for h in SPACE["hidden_dim"] for lr in SPACE["lr"])
        by_key = {m["key"]: m for m in members[name]}
        assert all(c["heldout_mse"] == by_key[c["key"]]["heldout_mse"] for c in rec["candidates"])
        assert rec["heldout_mse"] == min(c["heldout_mse"] for c in rec["candidates"])
        model = json.loads((Path(rec["model_dir"]) / "params.json").read_text())
        assert model["training"]["resolved"]["population"]["members"] == 2
        assert model["metrics"]["heldout_mse"] == rec["heldout_mse"]
    # MLflow: each member is a run of its own, with its own learning curve (12 epochs, one point each).
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == job["job"]]
    runs = client.search_runs([experiment.experiment_id], "tags.invdyn_kind = 'trial'")
    ledger_ids = {m["trial_id"]: m for ms in members.values() for m in ms}
    assert sorted(r.data.tags["ray_trial_id"] for r in runs) == sorted(ledger_ids)
    for r in runs:
        m = ledger_ids[r.data.tags["ray_trial_id"]]
        history = client.get_metric_history(r.info.run_id, "val_mse")
        assert [h.value for h in history] == [p["val_mse"] for p in m["curve"]] and len(history) == 12
        assert float(r.data.params["lr"]) == m["config"]["lr"]
        assert r.data.metrics["heldout_mse"] == pytest.approx(m["heldout_mse"])


# ------------------------------------------------------------------------------------------- no Ray


def spec(key: str, hidden: int, dataset: str = "d") -> TrialSpec:
    return TrialSpec(dataset, "sha", key, {"hidden_dim": hidden, "lr": 0.001})


def test_population_members_round_trip_through_the_ledger(tmp_path):
    pop = PopulationSpec("d", "sha", "pop", (spec("a", 16), spec("b", 32), spec("c", 32)))
    members = [
        {
            "key": k,
            "index": i,
            "group": g,
            "group_size": n,
            "heldout_mse": mse,
            "train_time_s": t,
            "curve": [{}],
        }
        for i, (k, g, n, mse, t) in enumerate(
            [("a", 0, 1, 0.3, 2.0), ("b", 1, 2, 0.1, 5.0), ("c", 1, 2, 0.2, 4.0)]
        )
    ]
    result = {"members": members, "node_ip": "10.0.0.1", "device": "cpu", "eval_time_s": 9.0}
    head = {
        "trial_id": "t1",
        "checkpoint_path": "/ckpt/",
        "started_at": 1.0,
        "finished_at": 3.0,
        "wall_s": 2.0,
    }
    entries = populations.member_entries(pop, result, head)
    assert [(e.key, e.trial_id, e.checkpoint_path) for e in entries] == [
        ("a", "t1-m0", "/ckpt/a"),
        ("b", "t1-m1", "/ckpt/b"),
        ("c", "t1-m2", "/ckpt/c"),
    ]
    assert entries[1].heldout_mse == 0.1 and entries[1].node_ip == "10.0.0.1" and entries[1].wall_s == 2.0
    assert entries[2].population == {"trial": "pop", "members": 3, "group": 1, "group_size": 2}
    ledger = Ledger(tmp_path)
    populations.record_groups(ledger, pop, entries, "t1")
    assert len(list(ledger.dir.glob("*.json"))) == 2  # a file per shape group
    assert ledger.done() == {e.key: e for e in entries}  # members come back as the trials they stand for
    # a group trains its members at once: its time counts once (its longest member), a lone trial its own
    alone = TrialResult("x", "d", "sha", {}, trial_id="t2", train_time_s=1.0)
    assert populations.shared_time([*entries, alone]) == 2.0 + 5.0 + 1.0
    # a member the result does not hold is not recorded (it trains again on --resume)
    assert [e.key for e in populations.member_entries(pop, {"members": members[:1]}, head)] == ["a"]

    table = population_table(
        [{"key": "b", "trial_id": "t1-m1", "heldout_mse": 0.1, "tracking_drift": 0.5}], entries
    )
    assert [(row["key"], row["evaluated"], row["point"]) for row in table] == [
        ("b", True, {"hidden_dim": 32}),
        ("c", False, {"hidden_dim": 32}),
        ("a", False, {"hidden_dim": 16}),
    ]
    assert table[0]["tracking_drift"] == 0.5 and table[2]["heldout_mse"] == 0.3 and table[2]["group"] == 0


def test_populations_per_dataset_largest_first_and_the_default():
    info = {"transitions": 100, "obs_dim": 3, "act_dim": 2}
    trials = [spec("a", 16, "small"), spec("b", 64, "big"), spec("c", 64, "small"), spec("d", 64, "big")]
    pops = populations.make_populations(trials, _ready(info))
    assert [(p.dataset, [m.key for m in p.members]) for p in pops] == [
        ("big", ["b", "d"]),
        ("small", ["a", "c"]),
    ]
    assert pops[0].tune_config()["population"] == 2 and len({p.key for p in pops}) == 2
    assert populations.default_on(0.25, 1.0) and not populations.default_on(0.0, 1.0)
    assert not populations.default_on(1.0, 0.0)  # no GPU in the cluster (yet): trials train alone


def _ready(info):
    from pipeline.job.records import PreparedDataset

    return {name: PreparedDataset(name, name, "sha", info) for name in ("small", "big")}


def test_summary_table_leads_with_test_metrics_when_the_models_have_them():
    plain = {"dataset": "d", "status": "ok", "heldout_mse": 0.25, "trials": 4, "trials_finished": 4}
    table = format_table([plain])
    assert table.splitlines()[0].startswith("| dataset | status | held-out MSE |") and "test" not in table
    tested = {**plain, "test_mse": 0.125, "test_r2": 0.8125, "population": 4}
    header, _, row = format_table([tested, plain]).splitlines()[:3]
    assert header.startswith("| dataset | status | test MSE | test R² | held-out MSE |")
    assert row.startswith("| d | ok | 0.125 | 0.812 | 0.25 |") and "4/4 (population of 4)" in row
