"""The closed loop inside the Ray job: `pretrain_all --select-by plan_return` chooses among trials by the
return oracle plans deliver on validation seeds, reports the kept model on test seeds into summary.json,
summary.md, params.json, the card and its plot, tags the registered version, and the champion rule follows
(real Ray, real MuJoCo, the committed agents, a real SQLite MLflow store)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.job import HOPPER, job_env, run_job
from helpers.paths import REPO
from mlflow import MlflowClient

import invdyn
from pipeline.job.pretrain_all import parse_args
from pipeline.registry import store
from pipeline.registry.champion import decide

EPISODES = 3


@pytest.fixture(scope="module")
def plan_job(sim_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-job")
    out = root / "out"
    proc = run_job(
        [
            "--datasets",
            str(sim_files[HOPPER]),
            "--search-space",
            '{"hidden_dim": [16, 64]}',
            "--max-epochs",
            "2",
            "--select-by",
            "plan_return",
            "--eval-closed-loop-episodes",
            str(EPISODES),
            "--eval-closed-loop-noise",
            "0,0.1",
            "--eval-starts",
            "8",
            "--eval-samples",
            "100",
            "--out",
            str(out),
        ],
        job_env(root),
    )
    records = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    return {"proc": proc, "out": out, "record": records[HOPPER], "uri": store.default_uri(out), "root": root}


@pytest.mark.slow
def test_plan_return_chooses_on_validation_seeds_and_the_report_uses_test_seeds(plan_job):
    assert plan_job["proc"].returncode == 0, plan_job["proc"].stderr[-3000:]
    rec = plan_job["record"]
    assert rec["selected_by"] == rec["champion_metric"] == "plan_return"
    cands = rec["candidates"]
    assert len(cands) == 2 and all(c["plan_return"] is not None for c in cands)
    best = max(cands, key=lambda c: c["plan_return"])
    assert rec["key"] == best["key"]
    rows = rec["evaluation"]["closed_loop"]
    assert [(r["planner"], r["plan_noise"], r["episodes"], r["seeds"]) for r in rows] == [
        ("expert", 0.0, EPISODES, "test"),
        ("expert", 0.1, EPISODES, "test"),
    ]
    for row in rows:
        low, high = row["normalized_return_ci95"]
        assert low <= row["normalized_return"] <= high and 0 <= row["fall_rate"] <= 1
        assert row["actor_normalized_return"] > 60 > row["baseline_normalized_return"]
        assert row["return_ratio"] == pytest.approx(row["return"] / row["actor_return"])
    # the model directory: params.json metrics.closed_loop, the card's table and its plot
    model = invdyn.read_model_dir(rec["model_dir"])
    assert model.params["metrics"]["closed_loop"] == rows
    assert "### Closed loop" in model.card and (model.path / "closed_loop.png").is_file()
    table = (plan_job["out"] / "summary.md").read_text()
    assert f"| {HOPPER} | expert | 0.1 |" in table
    assert "plan return" in plan_job["proc"].stdout


@pytest.mark.slow
def test_the_registered_version_carries_the_closed_loop_and_the_rule_follows_it(plan_job):
    rec, uri = plan_job["record"], plan_job["uri"]
    reg = rec["registration"]
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version(reg["model_name"], reg["version"])
    assert float(version.tags["eval.plan_return"]) == pytest.approx(rec["evaluation"]["plan_return"])
    assert version.tags["closed_loop_protocol"] == f"expert@k1 σ=0,0.1 n={EPISODES} test"
    key = "eval.closed_loop.expert.sigma_0.1.normalized_return"
    assert float(version.tags[key]) == pytest.approx(rec["evaluation"]["closed_loop"][1]["normalized_return"])
    assert client.get_registered_model(reg["model_name"]).tags["champion_metric"] == "plan_return"
    assert reg["champion"]


@pytest.mark.slow
def test_invdyn_info_shows_the_closed_loop(plan_job):
    model_dir = plan_job["record"]["model_dir"]
    env = job_env(plan_job["root"])
    out = subprocess.run(
        [sys.executable, "-m", "invdyn", "info", HOPPER, "--source", model_dir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Closed loop: executing a planner's plans (model card):" in out.stdout and "expert" in out.stdout


def _version(n: int, plan_return: float, protocol: str, mse: float = 1.0):
    from types import SimpleNamespace

    tags = {
        "heldout_mse": repr(mse),
        "dataset_sha256": "a" * 64,
        "protocol": "p",
        "eval.plan_return": repr(plan_return),
        "closed_loop_protocol": protocol,
    }
    return SimpleNamespace(version=str(n), tags=tags)


def test_the_champion_rule_prefers_the_higher_return_under_one_protocol():
    same = [_version(1, 50.0, "x"), _version(2, 80.0, "x", mse=2.0), _version(3, 60.0, "x")]
    assert decide(same, "plan_return").target == "2"  # higher is better, whatever the MSE says
    assert decide(same, "heldout_mse").target == "1"
    # a version under another protocol (other σ, episodes or seeds) does not compare
    mixed = [_version(1, 50.0, "x"), _version(2, 99.0, "y")]
    assert decide(mixed, "plan_return", anchor="1").target == "1"


def test_select_by_plan_return_needs_the_closed_loop(capsys):
    assert parse_args(["--select-by", "plan_return"]).evaluation.closed_loop_episodes == 10
    with pytest.raises(SystemExit):
        parse_args(["--select-by", "plan_return", "--eval-closed-loop-episodes", "0"])
    assert "needs the closed loop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--eval-closed-loop-noise", "0,-1"])
    assert "σ values >= 0" in capsys.readouterr().err
