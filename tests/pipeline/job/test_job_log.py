"""What the job prints: a successful job's log is quiet and truthful (a line per finished trial, the summary
table, nothing on stderr that reads as a warning), -v brings Tune's table back, and bad arguments are refused
before Ray starts."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
from helpers.job import job_env
from helpers.paths import REPO

from pipeline.job import console
from pipeline.job.pretrain_all import main, parse_args

TRIAL_LINE = re.compile(r"^\[(\d+)/(\d+) done, (\d+) failed\] (\S+) \((hidden_dim=\d+)\): held-out MSE \S+, ")
SCARY = re.compile(r"warning|failed|traceback", re.IGNORECASE)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_successful_job_logs_a_line_per_trial_and_no_warning(tmp_path):
    """The contract command (plus a two-point search) in a fresh home: the sim dataset is simulated, two
    trials train, MLflow (SQLite) tracks and registers; stdout and stderr are files, not a terminal."""
    env = job_env(tmp_path, INVDYN_SIM_TRANSITIONS="3000")
    cmd = [sys.executable, "-m", "pipeline.pretrain_all", "--datasets", "sim-hopper-random-v0"]
    cmd += ["--max-epochs", "3", "--search-space", '{"hidden_dim": [32, 64]}', "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    assert proc.returncode == 0
    assert not [ln for ln in proc.stderr.splitlines() if SCARY.search(ln)]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no progress-bar frames in a log file
    lines = proc.stdout.splitlines()
    trials = [m for m in map(TRIAL_LINE.match, lines) if m]
    assert sorted(m[5] for m in trials) == ["hidden_dim=32", "hidden_dim=64"]
    assert [(m[1], m[2], m[3], m[4]) for m in trials] == [
        ("1", "2", "0", "sim-hopper-random-v0"),
        ("2", "2", "0", "sim-hopper-random-v0"),
    ]
    # the summary table: the test part's metrics lead when the models have one (the default split does)
    header = [
        i
        for i, ln in enumerate(lines)
        if ln.startswith("| dataset | status | test MSE | test R² | held-out MSE")
    ]
    assert len(header) == 1 and lines[header[0] + 2].startswith("| sim-hopper-random-v0 | ok |")
    assert not any(mark in proc.stdout for mark in ("Trial status", "│", "View detailed results"))


def test_verbosity_flags():
    assert parse_args([]).verbose == 0
    assert [parse_args(a).verbose for a in (["-v"], ["-vv"], ["-vvv"], ["--verbose", "2"])] == [1, 2, 2, 2]
    with pytest.raises(SystemExit):
        parse_args(["--verbose", "3"])


def test_quiet_tune_output_takes_the_engine_that_is_silent(monkeypatch):
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    from ray.tune.experimental.output import get_air_verbosity

    assert console.tune_verbosity(0) == 0 and get_air_verbosity(0) is None  # the old engine: silent at 0
    assert console.tune_verbosity(1) == 1 and get_air_verbosity(1) is not None  # the status table


def test_the_filter_drops_only_its_lines(caplog):
    console.quiet_ray_logs()
    console.quiet_ray_logs()  # idempotent
    name, start, _why = console.QUIET_RAY_LINES[0]
    log = logging.getLogger(name)
    assert sum(isinstance(f, console._DropLines) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=name):
        log.warning(start + ". Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster.")  # kept: it is a risk
    assert [r.getMessage() for r in caplog.records] == [
        "Token authentication is disabled for this Ray cluster."
    ]
    tune = logging.getLogger("ray.tune.utils.util")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=tune.name):
        tune.warning(
            "Processing trial results took 2.766 s, which may be a performance bottleneck. Please ..."
        )
        tune.warning(
            "The `process_trial_result` operation took 2.766 s, which may be a performance bottleneck."
        )
        tune.warning(
            "The `callbacks.on_trial_result` operation took 2.2 s, which may be a performance bottleneck."
        )
        tune.warning("Install psutil to monitor system performance.")
    assert [r.getMessage() for r in caplog.records] == ["Install psutil to monitor system performance."]


def test_trial_lines_name_the_search_point_and_draw_no_frames_in_a_log(capsys):
    configs = [{"hidden_dim": 32, "lr": 1e-3}, {"hidden_dim": 64, "lr": 1e-3}]
    progress = console.TrialProgress(2, varying=console.varying_fields(configs))
    progress.open()  # stdout / stderr are not terminals here: the bar stays off
    progress.finished_line("d", configs[0], {"heldout_mse": 0.01234567, "epochs": 1}, 3.2)
    progress.failed_line("d", configs[1], "RuntimeError: boom")
    progress.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "[1/2 done, 0 failed] d (hidden_dim=32): held-out MSE 0.01235, 1 epoch, 3 s",
        "[1/2 done, 1 failed] d (hidden_dim=64): FAILED: RuntimeError: boom",
    ]
    assert err == ""


@pytest.mark.parametrize(
    ("datasets", "said"),
    [
        ("walker2d-medium-expert-v2", "python -m pipeline.datasets download walker2d-medium-expert-v2"),
        ("hopper-medium-v2,minari:nosuch/none-v0", "2 of the 2 datasets are not available"),
    ],
)
def test_missing_datasets_are_refused_before_ray_starts(tmp_path, capsys, datasets, said):
    import ray

    assert main(["--datasets", datasets, "--out", str(tmp_path / "o"), "--no-mlflow"]) == 2
    out, err = capsys.readouterr()
    assert said in err and "Traceback" not in err
    assert out == "" and not ray.is_initialized() and not (tmp_path / "o" / "job.json").exists()


def test_an_output_folder_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["--datasets", "sim-hopper-random-v0", "--out", str(tmp_path / "f" / "o")]) == 2
    assert "a file is in the way" in capsys.readouterr().err
