"""`python -m pipeline.train`: the no-cluster path writes a loadable model directory with its metrics."""

import json
import subprocess
import sys

import pytest

import invdyn
from pipeline.training.cli import main


def run_cli(*args):
    # -W error: any warning on the way (torch, numpy, h5py, matplotlib) fails the command
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "pipeline.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_model_dir(sim_files, tmp_path):
    out = tmp_path / "hopper-idm"
    proc = run_cli(
        "--dataset",
        str(sim_files["sim-hopper-random-v0"]),
        "--out",
        str(out),
        "--max-epochs",
        "3",
        "--patience",
        "5",
        "--seed",
        "1",
        "--split",
        "transitions",
        "--hidden-dim",
        "64",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("val_mse") == 3  # one progress line per evaluation
    assert "test MSE (actions)" in proc.stdout and "validation MSE (heldout_mse)" in proc.stdout
    params = json.loads((out / "params.json").read_text())
    m = params["metrics"]
    assert m["epochs"] == 3 and 0 < m["heldout_mse"] < m["baseline_mse"]
    assert [r["epoch"] for r in params["learning_curve"]] == [1, 2, 3]
    assert params["training"]["split_kind"] == "transitions" and params["training"]["seed"] == 1
    assert params["training"]["split"]["kind"] == "transitions" and params["training"]["split"]["seed"] == 1
    assert params["config"]["hidden_dim"] == 64 and params["config"]["obs_dim"] == 11
    assert proc.stderr == ""  # nothing to warn about on a successful run
    model = invdyn.read_model_dir(out)
    assert "![learning curve" in model.card and (out / "learning_curve.png").is_file()
    assert model.predict(
        params["normalizers"]["state"]["mean"], params["normalizers"]["state"]["mean"]
    ).shape == (3,)


def test_cli_bad_config_fails_clearly(sim_files, tmp_path, capsys):
    data = str(sim_files["sim-hopper-random-v0"])
    assert main(["--dataset", data, "--out", str(tmp_path / "m"), "--hidden-dim", "0"]) == 2
    assert "hidden_dim must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["--dataset", data, "--out", str(tmp_path / "m"), "--batch-size", "100000"]) == 2
    assert "batch_size=100000 is larger than the training split" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", data, "--out", str(tmp_path / "m"), "--split", "bogus"])
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_cli_unknown_dataset(tmp_path, capsys):
    assert main(["--dataset", "no-such-dataset-v9", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no-such-dataset-v9" in err and "Traceback" not in err


def test_cli_checks_out_and_name_before_making_any_data(tmp_path, capsys, isolated_dirs):
    """A catalog sim name would be simulated (50k MuJoCo steps) before training: a bad --out or --name
    is refused first, and no dataset file appears."""
    d4rl = isolated_dirs / "d4rl"
    (tmp_path / "a-file").write_text("x")
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    cases = [
        (["--out", str(tmp_path / "a-file" / "model")], "a file is in the way"),
        (["--out", str(tmp_path / "a-file")], "is a file"),
        (["--out", str(mine)], "holds other files and no model"),
        (["--out", str(tmp_path / "m"), "--name", "a/b"], "is not a model name"),
        (["--out", str(tmp_path / "m"), "--lr", "-1"], "lr must be a finite number >= 0"),
    ]
    for args, message in cases:
        assert main(["--dataset", "sim-hopper-random-v0", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert list(d4rl.iterdir()) == []
    assert (mine / "notes.txt").read_text() == "keep me"
