"""Export: the registered champions as one bundle, reproducible, loading offline like the registry's
champion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.mlflow_server import model_record
from helpers.paths import REPO

import invdyn
from pipeline.registry import store
from pipeline.registry.export import champions, export_bundle
from pipeline.registry.export import main as export_main
from pipeline.registry.register import register_dataset

A, B = "sim-halfcheetah-random-v0", "sim-hopper-random-v0"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite registry: A has a worse and a better version (champion v2), B one version."""
    tmp_path = tmp_path_factory.mktemp("registry")
    uri = store.default_uri(tmp_path / "job")
    register_dataset(uri, model_record(tmp_path, A, 1, 0.5))
    register_dataset(uri, model_record(tmp_path, A, 2, 0.3))
    register_dataset(uri, model_record(tmp_path, B, 3, 0.4))
    return uri


def test_export_is_reproducible_and_loads_offline_like_the_champion(registry, tmp_path, monkeypatch):
    cli = [
        sys.executable,
        "-m",
        "pipeline.registry.export",
        "--out",
        str(tmp_path / "cli.zip"),
        "--mlflow-uri",
        registry,
    ]
    proc = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"invdyn-{A} v2" in proc.stdout and f"invdyn-{B} v1" in proc.stdout
    path = export_bundle(registry, tmp_path / "bundle.zip")
    assert path.read_bytes() == (tmp_path / "cli.zip").read_bytes()  # same registry state, same bytes
    manifest = invdyn.verify_bundle(path)
    lineage = {m["name"]: m for m in manifest["registry"]["models"]}
    assert {m["name"] for m in manifest["models"]} == {A, B} == set(lineage)
    assert (lineage[A]["model_name"], lineage[A]["version"], float(lineage[A]["heldout_mse"])) == (
        f"invdyn-{A}",
        "2",
        0.3,
    )
    assert (
        lineage[A]["run_id"]
        and lineage[A]["weights_sha256"] == manifest["models"][0]["files"]["model.ckpt"]["sha256"]
    )
    assert manifest["registry"]["alias"] == "champion"

    obs = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    nxt = obs + 0.05
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    expected = {n: invdyn.load(n, source=f"models:/invdyn-{n}@champion").predict(obs, nxt) for n in (A, B)}
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    assert sorted(invdyn.fetch(path, progress=False)) == [A, B]
    for name in (A, B):
        np.testing.assert_array_equal(invdyn.load(name).predict(obs, nxt), expected[name])


def test_export_selected_datasets_and_clear_errors(registry, tmp_path):
    only = export_bundle(registry, tmp_path / "b.zip", datasets=[B])
    assert [m["name"] for m in invdyn.verify_bundle(only)["models"]] == [B]
    with pytest.raises(store.TrackingError, match=f"sim-walker2d-random-v0.*registered: {A}, {B}"):
        export_bundle(registry, tmp_path / "c.zip", datasets=["sim-walker2d-random-v0"])
    with pytest.raises(store.TrackingError, match="no registered invdyn-\\* model has alias 'best'"):
        export_bundle(registry, tmp_path / "d.zip", alias="best")
    assert not (tmp_path / "c.zip").exists() and not (tmp_path / "d.zip").exists()


def test_export_refuses_a_tampered_artifact(registry, tmp_path):
    champion = next(c for c in champions(registry) if c["model_name"] == f"invdyn-{A}")
    ckpt = Path(champion["source"].removeprefix("file://")) / "model.ckpt"
    original = ckpt.read_bytes()
    ckpt.write_bytes(original[:-10] + b"0123456789")
    try:
        with pytest.raises(invdyn.ChecksumError, match="model.ckpt"):
            export_bundle(registry, tmp_path / "e.zip")
    finally:
        ckpt.write_bytes(original)  # the registry is shared by this module's tests
    assert not (tmp_path / "e.zip").exists()


def test_export_cli_without_a_store_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert export_main(["--out", "x.zip"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store" in err and "python -m pipeline.pretrain_all" in err
    assert not (tmp_path / "invdyn-out").exists() and not (tmp_path / "x.zip").exists()


def test_export_cli_checks_its_arguments_before_any_download(registry, tmp_path, capsys, monkeypatch):
    db = store.sqlite_path(registry)
    downloads = []
    monkeypatch.setattr("pipeline.registry.export.download_version", lambda *a: downloads.append(a))
    (tmp_path / "folder").mkdir()
    cases = {
        str(tmp_path / "missing" / "x.zip"): "does not exist",
        str(tmp_path / "folder"): "is a folder",
    }
    for out, said in cases.items():
        assert export_main(["--out", out, "--mlflow-uri", registry]) == 2
        assert said in capsys.readouterr().err
    assert export_main(["--out", str(tmp_path / "x.zip"), "--alias", "v1", "--mlflow-uri", registry]) == 2
    assert "not a valid MLflow alias" in capsys.readouterr().err
    assert export_main(["--out", str(tmp_path / "x.zip"), "--mlflow-uri", f"sqlite:///{db}.nope"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert downloads == [] and not (tmp_path / "x.zip").exists()
