"""`pretrain_all --split-seeds 0,1 --report DIR` on a real local Ray and a real MLflow SQLite store: each
split seed's repeat trains on its own split, only the first seed's model is registered and exported, and
the report's over-split table is the mean of the repeats' test figures. Plus the flag's bad input."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from helpers.job import HOPPER, job_env, run_job

from invdyn.bundle import verify_bundle
from pipeline.job.config import JobConfigError
from pipeline.job.pretrain_all import main, parse_args
from pipeline.job.split_repeats import plan


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def job(sim_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("split-seeds")
    out = root / "out"
    proc = run_job(
        [
            "--datasets",
            str(sim_files[HOPPER]),
            "--search-space",
            '{"hidden_dim": [32]}',
            "--max-epochs",
            "2",
            "--split-seeds",
            "0,1",
            "--eval-horizon",
            "8",
            "--eval-starts",
            "8",
            "--eval-samples",
            "200",
            "--out",
            str(out),
            "--export",
            str(root / "bundle.zip"),
            "--report",
            str(root / "report"),
            "--report-recipe-epochs",
            "2",
        ],
        job_env(root),
    )
    summaries = {s: json.loads((out / f"split-{s}" / "summary.json").read_text()) for s in (0, 1)}
    recs = {s: recs[0] for s, recs in summaries.items()}
    return {"proc": proc, "root": root, "out": out, "rec": recs, "dataset": sim_files[HOPPER]}


@pytest.mark.slow
def test_each_repeat_trains_on_its_own_split(job):
    assert job["proc"].returncode == 0
    splits = {}
    for seed, rec in job["rec"].items():
        assert (
            rec["status"] == "ok" and Path(rec["model_dir"]).parent == job["out"] / f"split-{seed}" / "models"
        )
        [trial] = [
            json.loads(p.read_text()) for p in (job["out"] / f"split-{seed}" / "trials").glob("*.json")
        ]
        assert trial["config"]["split_seed"] == seed and trial["trial_id"] == rec["trial_id"]
        params = json.loads((Path(rec["model_dir"]) / "params.json").read_text())
        splits[seed] = params["training"]["split"]
        assert splits[seed]["seed"] == seed and params["metrics"]["test_mse"] == rec["test_mse"]
    assert splits[0]["test_episode_ids"] != splits[1]["test_episode_ids"]
    assert not (job["out"] / "summary.json").exists()  # a repeat's summary is in its own folder
    state = json.loads((job["out"] / "job.json").read_text())
    assert state["split_seeds"] == [0, 1] and state["registered_split_seed"] == 0
    assert [r["last_run"]["ran"] for r in state["repeats"]] == [1, 1]
    over = json.loads((job["out"] / "splits.json").read_text())["datasets"][HOPPER]["summary"]["test_mse"]
    assert over["n"] == 2 and over["mean"] == pytest.approx(
        (job["rec"][0]["test_mse"] + job["rec"][1]["test_mse"]) / 2
    )


@pytest.mark.slow
def test_only_the_first_split_seeds_model_is_registered_and_exported(job):
    from mlflow import MlflowClient

    first, other = job["rec"][0], job["rec"][1]
    assert first["registration"]["champion"] is True and "registration" not in other
    assert "only split seed 0's models" in job["proc"].stdout
    client = MlflowClient(f"sqlite:///{job['out'] / 'mlflow.db'}")
    [version] = client.search_model_versions(f"name = '{first['registration']['model_name']}'")
    assert str(version.version) == str(first["registration"]["version"])
    [model] = verify_bundle(job["root"] / "bundle.zip")["models"]
    weights = sorted(f for f in model["files"] if f != "params.json")
    assert weights, model["files"]
    for name in weights:
        assert model["files"][name]["sha256"] == sha256(Path(first["model_dir"]) / name)
        assert model["files"][name]["sha256"] != sha256(Path(other["model_dir"]) / name)


@pytest.mark.slow
def test_report_gives_the_mean_over_the_splits_of_the_test_figures(job):
    report = job["root"] / "report"
    md = (report / "report.md").read_text()
    row = re.search(
        rf"^\| {HOPPER} \| 0,1 \| action MSE \| ([^|]+) \| ([^|]+) \| ([^|]+) \| [^|]+ \| (\d+) \|", md, re.M
    )
    assert row, md
    champion, recipe, baseline, n = (c.strip() for c in row.groups())
    mean = (job["rec"][0]["test_mse"] + job["rec"][1]["test_mse"]) / 2
    assert n == "2" and " ± " in champion and " ± " in recipe and " ± " in baseline
    assert float(champion.split(" ± ")[0]) == pytest.approx(mean, rel=1e-3)
    over = json.loads((report / "over_splits.json").read_text())[HOPPER]
    assert over["split_seeds"] == [0, 1] and over["heldout_mse"]["champion"]["n"] == 2
    assert over["heldout_mse"]["champion"]["mean"] == pytest.approx(mean, rel=1e-4)
    assert over["heldout_mse"]["recipe"]["n"] == 2  # the recipe was trained on each split too
    assert f"| {HOPPER} (split 1) | action MSE |" in md  # each split's own row, named by its seed


def test_bad_split_seeds_are_a_usage_error_naming_the_flag_and_the_fix(capsys, sim_files, tmp_path):
    for text, message in (
        ("a,b", "integers >= 0 separated by commas (0,1,2)"),
        ("0,0", "names split seed 0 twice; give each split seed once, e.g. --split-seeds 0,1,2"),
        ("", "integers >= 0 separated by commas (0,1,2)"),
        ("0,-1", "integers >= 0 separated by commas (0,1,2)"),
    ):
        with pytest.raises(SystemExit) as stop:
            parse_args(["--split-seeds", text])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "--split-seeds" in err and message in err, (text, err)
    assert parse_args(["--split-seeds", "2, 0"]).seeds() == [2, 0]  # the order given: 2 is registered
    assert parse_args([]).seeds() is None
    # the repeats set split_seed, so a search over it is refused before Ray starts or anything is written
    with pytest.raises(JobConfigError, match="drop split_seed from --search-space"):
        plan(tmp_path, [0, 1], {"split_seed": [0, 1]})
    out = tmp_path / "out"
    args = ["--datasets", str(sim_files[HOPPER]), "--split-seeds", "0,1", "--no-mlflow", "--out", str(out)]
    assert main([*args, "--search-space", '{"split_seed": [3]}']) == 2
    err = capsys.readouterr().err
    assert "error: --split-seeds" in err and "Traceback" not in err
    assert not (out / "job.json").exists()


@pytest.mark.slow
def test_resume_reruns_only_the_repeat_whose_ledger_is_incomplete(job):
    """Runs last in this module: it retrains split seed 1 in the job's folder (split seed 0 stays)."""
    out = job["out"]
    kept = {
        s: [json.loads(p.read_text()) for p in (out / f"split-{s}" / "trials").glob("*.json")] for s in (0, 1)
    }
    for p in (out / "split-1" / "trials").glob("*.json"):
        p.unlink()  # as if the driver died during split seed 1's trial
    again = run_job(
        ["--datasets", str(job["dataset"]), "--search-space", '{"hidden_dim": [32]}', "--max-epochs", "2"]
        + ["--split-seeds", "0,1", "--resume", "--no-mlflow", "--no-evaluate", "--out", str(out)],
        job_env(job["root"]),
    )
    assert again.returncode == 0
    assert "split seed 0: job" in again.stdout and "1 already finished, 0 to run" in again.stdout
    assert "split seed 1: job" in again.stdout and "0 already finished, 1 to run" in again.stdout
    [first] = [json.loads(p.read_text()) for p in (out / "split-0" / "trials").glob("*.json")]
    assert first["trial_id"] == kept[0][0]["trial_id"] and first["finished_at"] == kept[0][0]["finished_at"]
    [second] = [json.loads(p.read_text()) for p in (out / "split-1" / "trials").glob("*.json")]
    assert second["key"] == kept[1][0]["key"] and second["trial_id"] != kept[1][0]["trial_id"]
    state = json.loads((out / "job.json").read_text())
    assert state["runs"] == 2 and [r["last_run"]["ran"] for r in state["repeats"]] == [0, 1]
