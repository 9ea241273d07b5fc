"""The datasets CLI contract, run as a user runs it: `python -m pipeline.datasets ...`."""

import json
import subprocess
import sys

import pytest

from pipeline.data.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.datasets", *args], capture_output=True, text=True, timeout=180
    )


def test_info_json_of_a_file(sim_files):
    path = sim_files["sim-hopper-random-v0"]
    r = run_cli("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["transitions"] == 6000 and (info["obs_dim"], info["act_dim"]) == (11, 3)
    assert info["episodes"] > 50 and len(info["sha256"]) == 64 and info["env_id"] == "Hopper-v5"
    assert info["name"] == "sim-hopper-random-v0" and info["cache"].endswith(".arrow")


def test_bad_name_exits_nonzero_with_reason_on_stderr():
    r = run_cli("info", "walker2d-medium-v9", "--json")
    assert r.returncode != 0 and r.stdout == ""
    assert "unknown dataset 'walker2d-medium-v9'" in r.stderr and "walker2d-medium-v2" in r.stderr


def test_list_shows_status(sim_files, capsys):
    assert main(["list", "--suite", "mujoco", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 15 and {r["status"] for r in rows} == {"missing"}
    assert main(["list", "--suite", "sim"]) == 0
    table = capsys.readouterr().out
    assert "sim-halfcheetah-mixed-v0" in table and "missing (simulated on demand)" in table


def test_prepare_then_list_says_cached(capsys, monkeypatch):
    monkeypatch.setenv("INVDYN_SIM_TRANSITIONS", "1200")
    assert main(["prepare", "sim-halfcheetah-ou-v0"]) == 0
    assert "sim-halfcheetah-ou-v0: 1200 transitions" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (
        rows["sim-halfcheetah-ou-v0"]["status"] == "cached" and rows["sim-halfcheetah-ou-v0"]["size_mb"] > 0
    )


@pytest.mark.parametrize("args", [["info", "/no/such.hdf5"], ["prepare", "hopper-medium-v2"]])
def test_errors_exit_nonzero(args, capsys):
    assert main(args) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("/no/such.hdf5" in err or "hopper_medium-v2.hdf5" in err)


def test_download_skips_simulated_names(capsys, monkeypatch):
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    assert main(["download", "sim"]) == 0
    assert capsys.readouterr().err.count("simulated on demand, nothing to download") == 3
    assert main(["download", "sim-hopper-ou-v0", "kitchen-mixed-v0"]) != 0  # the D4RL one cannot be fetched
    err = capsys.readouterr().err
    assert "kitchen/kitchen_microwave_kettle_bottomburner_light-v0.hdf5" in err


def test_prepare_checks_every_dataset_before_making_any(capsys, monkeypatch):
    monkeypatch.setenv("INVDYN_SIM_TRANSITIONS", "1200")
    from pipeline.data.catalog import file_path

    # the simulated one would be generated first; the missing D4RL file stops the command before that
    assert main(["prepare", "sim-hopper-ou-v0", "hopper-medium-v2"]) == 1
    err = capsys.readouterr().err
    assert "hopper_medium-v2.hdf5" in err and "--download" in err
    assert not file_path("sim-hopper-ou-v0").exists()
    assert main(["prepare", "--no-simulate", "sim-hopper-ou-v0", "walker2d-medium-v2"]) == 1
    err = capsys.readouterr().err
    assert "2 of the 2 datasets are not available" in err
    assert "python -m pipeline.simulate sim-hopper-ou-v0" in err and "walker2d_medium-v2.hdf5" in err
