"""`python -m invdyn`: exit codes and output of list / info / fetch / verify."""

import json
import os
import subprocess
import sys

from helpers.models import CD_HOME, CD_NAME, make_bundle, make_model_dir, rewrite_zip

import invdyn
from invdyn.__main__ import main


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "invdyn", *args], capture_output=True, text=True, env=os.environ.copy()
    )


def test_verify_exit_codes(tmp_path):
    bundle = make_bundle(tmp_path)
    ok = _cli("verify", str(bundle))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "a-v0" in ok.stdout and "b-v0" in ok.stdout
    bad = rewrite_zip(bundle, tmp_path / "bad.zip", replace={"a-v0/README.md": b"# hacked\n"})
    res = _cli("verify", str(bad))
    assert res.returncode == 1
    assert "a-v0/README.md" in res.stderr and "Traceback" not in res.stderr and res.stdout == ""


def test_verify_missing_and_truncated(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "none.zip")]) == 1
    assert "none.zip does not exist" in capsys.readouterr().err
    bundle = make_bundle(tmp_path, names=("a-v0",))
    (tmp_path / "cut.zip").write_bytes(bundle.read_bytes()[:500])
    assert main(["verify", str(tmp_path / "cut.zip")]) == 1
    assert "truncated" in capsys.readouterr().err


def test_fetch_list_info(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(CD_HOME))
    assert main(["fetch", "--quiet", str(make_bundle(tmp_path))]) == 0
    assert "installed 2 model(s): a-v0, b-v0" in capsys.readouterr().out
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "location", "test_mse", "test_r2", "heldout_mse", "source"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"a-v0", "b-v0", CD_NAME}
    assert rows["b-v0"][2:6] == ["cache", "-", "-", "1.01"]  # no test figures recorded: "-", then validation
    assert "CleanDiffuser" in rows[CD_NAME]
    assert main(["info", "b-v0", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["metrics"]["heldout_mse"] == 1.01 and info["obs_dim"] == 5 and info["source"] == "invdyn cache"
    )
    assert main(["info", CD_NAME]) == 0
    assert "hidden_dim=512" in capsys.readouterr().out
    assert main(["info", "b-v1"]) == 1
    assert "Did you mean: b-v0" in capsys.readouterr().err


def test_list_leads_with_the_test_figures(tmp_path, capsys):
    """As the model cards do: test MSE and R² (test episodes no choice read) before the validation MSE."""
    d = make_model_dir(tmp_path / "dirs" / "t-v0", test_mse=0.0123, test_r2=0.9512, test_baseline_mse=0.5)
    assert main(["fetch", "--quiet", str(invdyn.write_bundle(tmp_path / "t.zip", [d]))]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[0].split(), lines[2].split()
    assert header[:5] == ["name", "location", "test_mse", "test_r2", "heldout_mse"]
    assert row[0] == "t-v0" and row[3:6] == ["0.0123", "0.9512", "0.01"]


def test_info_prints_the_cards_metrics_table(tmp_path, capsys):
    assert main(["fetch", "--quiet", str(make_bundle(tmp_path, names=("a-v0",)))]) == 0
    capsys.readouterr()
    assert main(["info", "a-v0"]) == 0
    out = capsys.readouterr().out
    table = out.split("Metrics (model card):\n", 1)[1].splitlines()
    assert table[0].split() == ["metric", "value"] and set(table[1]) <= {"-", " "}
    assert {tuple(line.split()) for line in table[2:]} == {("baseline_mse", "0.02"), ("heldout_mse", "0.01")}


def test_info_on_a_dataset_name_says_how_to_get_its_model(capsys):
    res = _cli("info", "walker2d-medium-expert-v2")
    assert res.returncode == 1 and res.stdout == "" and "Traceback" not in res.stderr
    assert "python -m pipeline.pretrain_all --datasets walker2d-medium-expert-v2 --download" in res.stderr
    assert "python -m invdyn fetch <bundle URL or .zip>" in res.stderr


def test_list_empty_and_fetch_offline(capsys, monkeypatch):
    assert main(["list"]) == 0
    assert "no models" in capsys.readouterr().out
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    assert main(["fetch", "http://127.0.0.1:9/bundle.zip"]) == 1
    assert "INVDYN_OFFLINE" in capsys.readouterr().err
