"""The job's typed contracts without Ray: flags generated from JobConfig / TrainConfig / EvalConfig, the
ledger's round trip, summary.json records, the one ranking rule in the trial choice, folder names."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pipeline.job.config import JobConfig
from pipeline.job.outputs import Ledger, write_curves
from pipeline.job.pretrain_all import parse_args
from pipeline.job.records import DatasetRecord, TrialResult
from pipeline.job.selection import Options, candidates, choose
from pipeline.quality.evaluate import EvalConfig
from pipeline.training.cli import build_parser
from pipeline.training.config import TrainConfig


def entry(key: str, mse: float, **more) -> TrialResult:
    return TrialResult(
        key=key, dataset="d", sha256="s", config={}, checkpoint_path=f"/ckpt/{key}", heldout_mse=mse, **more
    )


def test_job_flags_and_defaults_come_from_the_configs():
    job = parse_args([])
    assert job.train == TrainConfig() and job.evaluation == EvalConfig()
    assert job.datasets == "sim-medium-expert"  # the measured default (bench/demo_default.md)
    assert (job.mlflow, job.register, job.evaluate, job.select_by) == (True, True, True, "heldout_mse")
    job = parse_args(
        ["--no-mlflow", "--no-register", "--max-epochs", "7", "--seed", "3", "--eval-horizon", "8"]
    )
    assert not job.mlflow and not job.register
    assert job.train.max_epochs == 7 and job.train.seed == 3 and job.train.hidden_dim == 512
    assert job.evaluation == EvalConfig(horizon=8, seed=3)  # the job's seed seeds its evaluation too


def test_help_texts_name_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"most epochs to train (default: {TrainConfig().max_epochs})" in text
    assert f"closed-loop tracking horizon in steps (default: {EvalConfig().horizon})" in text
    with pytest.raises(SystemExit):
        parse_args(["--eval-starts", "0"])
    assert "--eval-starts" in capsys.readouterr().err


def test_train_cli_has_a_flag_per_train_config_field():
    dests = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    args = build_parser().parse_args(["--dataset", "x", "--out", "y", "--no-fp32-input-layer", "--lr", "0.5"])
    assert args.fp32_input_layer is False and args.lr == 0.5 and args.max_epochs == TrainConfig.max_epochs


def test_ledger_round_trip_and_damaged_entries(tmp_path):
    ledger = Ledger(tmp_path)
    kept = entry("k1", 0.5, curve=[{"epoch": 1, "val_mse": 0.5}], node_ip="10.0.0.1")
    ledger.record(kept)
    ledger.record(entry("k2", math.nan))  # NaN is written as null (invdyn._files.write_json)
    assert json.loads(ledger.path("k2").read_text())["heldout_mse"] is None
    ledger.path("k3").write_text("{not json")
    ledger.path("k4").write_text(json.dumps({**kept.to_json(), "key": "k4", "checkpoint_path": None}))
    done = ledger.done()
    assert set(done) == {"k1", "k2"} and done["k1"] == kept
    assert ledger.clear() == 4 and ledger.done() == {}


def test_trial_choice_follows_the_ranking_rule():
    opts = Options(select_by="tracking_drift", top=2)
    entries = [entry("b", 0.2), entry("a", 0.2), entry("c", 0.1), entry("nan", math.nan)]
    assert [e.key for e in candidates(entries, Options(), True)] == ["c"]
    cands = candidates(entries, opts, True)
    assert [e.key for e in cands] == ["c", "a"]  # equal MSE: the lower key first; NaN never competes
    assert [e.key for e in candidates(entries, Options(select_by="tracking_drift", top=0), True)] == [
        "c",
        "a",
        "b",
    ]
    picked = choose(cands, {"c": {"tracking_drift": 0.9}, "a": {"tracking_drift": 0.4}}, opts, None)
    assert (picked.entry.key, picked.selected_by, picked.note) == ("a", "tracking_drift", None)
    assert [row["tracking_drift"] for row in picked.table] == [0.9, 0.4]
    failed = {"c": {"error": "boom"}, "a": {"tracking_drift": float("nan")}}
    fallback = choose(cands, failed, opts, None)
    assert (fallback.entry.key, fallback.selected_by) == ("c", "heldout_mse")
    assert fallback.note == "tracking_drift unavailable (boom): selected by heldout_mse"
    assert choose(cands, {}, opts, "no qpos").note.startswith("tracking_drift unavailable (no qpos)")


def test_summary_record_keeps_its_json_fields():
    failed = DatasetRecord("x.hdf5", "x.hdf5", status="failed", error="KeyError: actions")
    assert failed.to_json() == {
        "dataset": "x.hdf5",
        "spec": "x.hdf5",
        "status": "failed",
        "error": "KeyError: actions",
    }
    rec = DatasetRecord(
        "d", "d", status="ok", info={"env_id": None, "transitions": 10}, trials=1, heldout_mse=0.1
    )
    assert rec.to_json() == {
        "dataset": "d",
        "spec": "d",
        "status": "ok",
        "env_id": None,  # what the dataset says, even when it says nothing
        "transitions": 10,
        "trials": 1,
        "heldout_mse": 0.1,
    }
    assert JobConfig().train is not JobConfig().train  # each job its own base config


def test_curves_are_named_like_the_model(tmp_path):
    curve = [{"epoch": 1, "val_mse": 0.1}]
    path = write_curves(tmp_path, "minari:door/expert-v0", [entry("k", 0.1, curve=curve)])
    assert path == tmp_path / "curves" / "minari-door-expert-v0.json" and path.with_suffix(".png").is_file()
    assert json.loads(path.read_text()) == {"k": {"trial_id": None, "config": {}, "curve": curve}}
