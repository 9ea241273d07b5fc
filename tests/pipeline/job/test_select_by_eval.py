"""Evaluation inside the Ray job: `pretrain_all --select-by tracking_drift` picks the trial whose actions
track best in MuJoCo, writes the evaluation into the model card, tags the registered version with `eval.*`
and makes the registry's champion follow the same metric (real Ray, real MuJoCo, real SQLite MLflow store)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import write_d4rl_file
from helpers.job import CHEETAH, job_env, run_job
from helpers.mlflow_server import model_record
from mlflow import MlflowClient

import invdyn
from pipeline.job.pretrain_all import parse_args
from pipeline.registry import store
from pipeline.registry.champion import choose_champion
from pipeline.registry.export import download_version
from pipeline.registry.register import register_dataset, register_from_storage


@pytest.fixture(scope="module")
def select_job(sim_files, tmp_path_factory):
    """One job: simulated HalfCheetah x 2 hidden sizes, and a dataset without simulator state, selected by
    drift."""
    root = tmp_path_factory.mktemp("select-job")
    out = root / "out"
    plain = root / "plain-data.hdf5"
    write_d4rl_file(plain, episodes=(40, 50, 45, 60, 38, 42), obs_dim=4, act_dim=2)
    proc = run_job(
        [
            "--datasets",
            f"{sim_files[CHEETAH]},{plain}",
            "--search-space",
            '{"hidden_dim": [32, 64]}',
            "--max-epochs",
            "2",
            "--batch-size",
            "64",
            "--select-by",
            "tracking_drift",
            "--eval-starts",
            "16",
            "--eval-samples",
            "200",
            "--out",
            str(out),
        ],
        job_env(root),
    )
    records = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    return {"proc": proc, "out": out, "records": records, "uri": store.default_uri(out)}


@pytest.mark.slow
def test_select_by_tracking_drift_picks_the_lowest_evaluated_drift(select_job):
    assert select_job["proc"].returncode == 0, select_job["proc"].stderr[-3000:]
    rec = select_job["records"][CHEETAH]
    assert rec["selected_by"] == rec["champion_metric"] == "tracking_drift"
    cands = rec["candidates"]
    assert len(cands) == 2 and all(math.isfinite(c["tracking_drift"]) for c in cands)
    assert len({c["tracking_drift"] for c in cands}) == 2  # two different models, two different drifts
    best = min(cands, key=lambda c: c["tracking_drift"])
    assert (rec["key"], rec["trial_id"], rec["heldout_mse"]) == (
        best["key"],
        best["trial_id"],
        best["heldout_mse"],
    )
    # the candidates' drifts (what chose) are on validation episodes; the kept model's evaluation, which the
    # card, summary.json and the registry report, is on its test episodes
    ev = rec["evaluation"]
    assert ev["part"] == "test" and ev["horizon"] == 32 and ev["tracking_starts"] == 16
    assert all(c.get("part", "val") == "val" for c in cands)
    assert ev["tracking_drift"] < ev["tracking_baseline"] and ev["one_step_floor"] < 1e-8
    # the model directory carries the evaluation (card + params.json) and still verifies its checksum
    model = invdyn.read_model_dir(rec["model_dir"])
    assert model.params["evaluation"]["tracking_drift"] == ev["tracking_drift"]
    assert "## Evaluation" in model.card and "tracking drift" in model.card
    table = (select_job["out"] / "summary.md").read_text()
    assert "selected by" in table and "tracking_drift" in table and f"{ev['tracking_drift']:.4g} @32" in table
    assert (
        f"{CHEETAH}: trial {rec['trial_id']} selected by tracking_drift of 2 evaluated"
        in select_job["proc"].stdout
    )


@pytest.mark.slow
def test_registered_version_carries_eval_tags_and_the_evaluated_card(select_job, tmp_path):
    rec = select_job["records"][CHEETAH]
    reg, uri = rec["registration"], select_job["uri"]
    assert reg["champion"] and reg["champion_metric"] == "tracking_drift"
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_registered_model(reg["model_name"]).tags["champion_metric"] == "tracking_drift"
    version = client.get_model_version(reg["model_name"], reg["version"])
    assert float(version.tags["eval.tracking_drift"]) == rec["evaluation"]["tracking_drift"]
    assert float(version.tags["eval.one_step_error"]) == rec["evaluation"]["one_step_error"]
    assert float(version.tags["eval.horizon"]) == 32
    # the held-out protocol the version competes under comes from its params.json training section
    assert version.tags["protocol"]
    assert version.tags["protocol_desc"] == "split=episodes val_fraction=0.15 test_fraction=0.15 seed=0"
    assert float(version.tags["test_mse"]) > 0  # the test episodes' figure leads the tags
    # what the registry serves is the evaluated directory, not the trial's upload from before the evaluation
    downloaded = invdyn.read_model_dir(download_version(uri, reg["model_name"], reg["version"], tmp_path))
    assert "## Evaluation" in downloaded.card
    assert downloaded.params["evaluation"]["tracking_drift"] == rec["evaluation"]["tracking_drift"]
    # re-registration from storage follows the same rule and adds nothing
    again = {r["dataset"]: r for r in register_from_storage(select_job["out"], uri)}
    assert again[CHEETAH]["status"] == "present" and again[CHEETAH]["champion"]


@pytest.mark.slow
def test_a_dataset_that_cannot_be_simulated_gets_action_metrics_and_a_note(select_job):
    rec = select_job["records"]["plain-data"]
    assert rec["status"] == "ok" and rec["selected_by"] == "heldout_mse" and len(rec["candidates"]) == 1
    assert "tracking_drift unavailable" in rec["selection_note"] and "infos/qpos" in rec["selection_note"]
    ev = rec["evaluation"]
    assert ev["tracking_drift"] is None and "infos/qpos" in ev["physics_reason"]
    assert ev["part"] == "test" and ev["heldout_mse"] == pytest.approx(rec["test_mse"], rel=1e-4)
    assert (
        "plain-data: trial" in select_job["proc"].stdout
        and "note: tracking_drift unavailable" in select_job["proc"].stdout
    )
    version = MlflowClient(select_job["uri"], registry_uri=select_job["uri"]).get_model_version(
        rec["registration"]["model_name"], rec["registration"]["version"]
    )
    assert "eval.tracking_drift" not in version.tags and float(version.tags["eval.heldout_mse"]) > 0


def test_select_by_a_physics_metric_needs_the_evaluation(capsys):
    assert parse_args([]).select_by == "heldout_mse" and parse_args([]).evaluate
    with pytest.raises(SystemExit):
        parse_args(["--select-by", "tracking_drift", "--no-evaluate"])
    assert "drop --no-evaluate" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the registry's rule


def _v(n, mse, sha="a", **evals):
    tags = {"heldout_mse": str(mse), "dataset_sha256": sha}
    tags.update({f"eval.{k}": str(v) for k, v in evals.items()})
    return SimpleNamespace(version=str(n), tags=tags)


def test_choose_champion_by_a_physics_metric():
    low_mse, low_drift = (
        _v(1, 0.1, tracking_drift=0.9, horizon=32.0),
        _v(2, 0.3, tracking_drift=0.5, horizon=32.0),
    )
    assert choose_champion([low_mse, low_drift]) == "1"
    assert choose_champion([low_mse, low_drift], "tracking_drift") == "2"  # lower drift, worse MSE
    # versions without the tag: held-out MSE decides when none carries it, else only carriers compete
    assert choose_champion([_v(1, 0.1), _v(2, 0.3)], "tracking_drift") == "1"
    assert (
        choose_champion([_v(1, 0.1), _v(2, 0.3, tracking_drift=2.0, horizon=32.0)], "tracking_drift") == "2"
    )
    # drift at another horizon is another quantity: the newest carrier's horizon decides which compare
    mixed = [
        _v(1, 0.1, tracking_drift=0.1, horizon=8.0),
        _v(2, 0.3, tracking_drift=0.5, horizon=32.0),
        _v(3, 0.2, tracking_drift=0.7, horizon=32.0),
    ]
    assert choose_champion(mixed, "tracking_drift") == "2"
    # newer data still wins over better numbers on older data; a tie on the metric goes to the lower
    # held-out MSE, then to the older version (pipeline.quality.metrics.rank, the job's rule too)
    assert choose_champion([low_mse, low_drift, _v(3, 0.9, sha="b")], "tracking_drift") == "3"
    tie = [_v(1, 0.2, one_step_error=0.4), _v(2, 0.1, one_step_error=0.4), _v(3, 0.1, one_step_error=0.4)]
    assert choose_champion(tie, "one_step_error") == "2"


def test_registry_champion_follows_the_registered_models_metric(tmp_path):
    uri = store.default_uri(tmp_path / "job")
    ds = "sim-hopper-random-v0"

    def record(seed, mse, drift=None, metric="tracking_drift"):
        evaluation = (
            {"heldout_mse": mse, "tracking_drift": drift, "horizon": 32} if drift is not None else None
        )
        return model_record(tmp_path, ds, seed, mse, evaluation=evaluation, champion_metric=metric)

    first = register_dataset(uri, record(1, 0.2, drift=0.9))
    assert first["champion"] and "first champion: tracking drift 0.9" in first["reason"]
    second = register_dataset(uri, record(2, 0.5, drift=0.4))  # worse MSE, better drift
    assert second["champion"] and "tracking drift 0.4 beats champion v1's 0.9" in second["reason"]
    unevaluated = record(3, 0.1)
    third = register_dataset(uri, unevaluated)  # best MSE, but no drift to compare
    assert not third["champion"] and "no eval.tracking_drift tag" in third["reason"]
    assert third["champion_version"] == "2"
    # the rule lives on the registered model: a job that selects by held-out MSE moves the alias back
    again = register_dataset(uri, {**unevaluated, "champion_metric": "heldout_mse"})
    assert (again["registered"], again["champion"], again["champion_metric"]) == (False, True, "heldout_mse")
    with pytest.raises(store.TrackingError, match="champion_metric 'speed' is not one of"):
        register_dataset(uri, record(4, 0.3, metric="speed"))
