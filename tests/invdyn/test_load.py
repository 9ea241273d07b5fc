"""invdyn.load: where it looks and in which order, MLflow sources, clear errors, light imports."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.models import CD_DIR, CD_HOME, CD_NAME, make_bundle, make_model_dir

import invdyn
from invdyn.settings import cleandiffuser_dir, model_cache_dir

X = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)


def _same(a, b) -> bool:
    return np.array_equal(a.predict(X, X), b.predict(X, X))


def test_resolution_order_source_then_cache_then_cleandiffuser(tmp_path):
    mine = make_model_dir(tmp_path / "src" / "a-v0", seed=1)
    cached = make_model_dir(tmp_path / "cache-copy" / "a-v0", seed=2)
    theirs = make_model_dir(tmp_path / "cd-copy" / "a-v0", seed=3)
    shutil.copytree(theirs, cleandiffuser_dir("a-v0"))
    assert _same(invdyn.load("a-v0"), invdyn.read_model_dir(theirs))
    assert invdyn.load("a-v0").source == "CleanDiffuser"
    shutil.copytree(cached, model_cache_dir() / "a-v0")
    assert _same(invdyn.load("a-v0"), invdyn.read_model_dir(cached))
    assert invdyn.load("a-v0").source == "invdyn cache"
    explicit = invdyn.load("a-v0", source=mine)
    assert _same(explicit, invdyn.read_model_dir(mine)) and not _same(explicit, invdyn.read_model_dir(cached))
    assert invdyn.load("a-v0", source=tmp_path / "src").path == mine  # a folder holding <name>/ works too


def test_load_from_bundle_path_installs_it(tmp_path):
    bundle = make_bundle(tmp_path)
    model = invdyn.load("b-v0", source=bundle)
    assert model.source == str(bundle) and not model.training
    assert sorted(p.name for p in model_cache_dir().iterdir() if not p.name.startswith(".")) == [
        "a-v0",
        "b-v0",
    ]
    assert model.metrics == {"heldout_mse": 1.01, "baseline_mse": 1.02}
    with pytest.raises(invdyn.ModelNotFoundError, match=r"has no model 'b-v1'.*Did you mean: b-v0"):
        invdyn.load("b-v1", source=bundle)


def test_inputs_numpy_torch_and_leading_shapes(tmp_path):
    model = invdyn.load("m", source=make_model_dir(tmp_path / "m", obs_dim=5, act_dim=2))
    for lead in [(4,), (4, 6)]:
        obs = np.random.default_rng(0).normal(size=(*lead, 5)).astype(np.float32)
        out = model.predict(obs, obs + 0.1)
        assert isinstance(out, np.ndarray) and out.shape == (*lead, 2)
        t = model.predict(torch.from_numpy(obs), torch.from_numpy(obs + 0.1))
        assert isinstance(t, torch.Tensor) and t.shape == (*lead, 2)
        np.testing.assert_allclose(t.numpy(), out, atol=1e-6)
        flat = model.predict(obs.reshape(-1, 5), (obs + 0.1).reshape(-1, 5))
        np.testing.assert_allclose(out.reshape(-1, 2), flat, atol=1e-6)
    with pytest.raises(invdyn.ShapeError, match="obs_dim=5"):
        model.predict(np.zeros((4, 11)), np.zeros((4, 11)))


def test_unknown_name_lists_available_and_nearest(tmp_path, monkeypatch):
    invdyn.fetch(make_bundle(tmp_path, names=("walker2d-medium-v2", "walker2d-medium-expert-v2")))
    monkeypatch.setenv("HOME", str(CD_HOME))
    with pytest.raises(invdyn.ModelNotFoundError) as e:
        invdyn.load("walker2d-medium-exper-v2")
    msg = str(e.value)
    assert "Did you mean: walker2d-medium-expert-v2" in msg
    assert f"Available: {CD_NAME}, walker2d-medium-expert-v2, walker2d-medium-v2." in msg
    with pytest.raises(invdyn.ModelNotFoundError, match="not a model name"):
        invdyn.load("../../etc")
    with pytest.raises(invdyn.ModelNotFoundError, match="does not exist"):
        invdyn.load("x", source=tmp_path / "nowhere")
    with pytest.raises(invdyn.DownloadError, match="only http"):
        invdyn.load("x", source="ftp://example.org/b.zip")


def test_an_unknown_dataset_name_says_which_command_trains_it_and_which_installs_it():
    """Nothing installed: a D4RL, simulated or Minari name gets the job's command and the bundle's."""
    fetch = "`python -m invdyn fetch <bundle URL or .zip>`"
    for name, flags in (("walker2d-medium-expert-v2", " --download"), ("sim-hopper-random-v0", "")):
        with pytest.raises(invdyn.ModelNotFoundError) as e:
            invdyn.load(name)
        msg = str(e.value)
        assert "No models are installed." in msg and fetch in msg
        assert f"`python -m pipeline.pretrain_all --datasets {name}{flags} --export invdyn-bundle.zip`" in msg
        assert f"invdyn.load({name!r}, source=" in msg
    with pytest.raises(invdyn.ModelNotFoundError) as e:
        invdyn.load("minari:door/expert-v0")  # a dataset id: the message names its model
    msg = str(e.value)
    assert "its model is named 'minari-door-expert-v0'" in msg and "minari download door/expert-v0" in msg
    assert "--datasets minari:door/expert-v0 --export" in msg and fetch in msg
    with pytest.raises(invdyn.ModelNotFoundError, match=r"--datasets minari:<dataset id>"):
        invdyn.load("minari-door-expert-v0")
    with pytest.raises(invdyn.ModelNotFoundError, match=r"--datasets /path/to/door-human-v1\.hdf5"):
        invdyn.load("door-human-v1")  # Adroit: not downloaded by the pipeline, trained from the file
    with pytest.raises(invdyn.ModelNotFoundError) as e:
        invdyn.load("my-own-model")
    assert "pretrain_all" not in str(e.value) and fetch in str(e.value)


def test_a_typo_gets_the_nearest_names_and_a_dataset_name_the_command(tmp_path):
    invdyn.fetch(make_bundle(tmp_path, names=("hopper-medium-v2",)))
    with pytest.raises(invdyn.ModelNotFoundError) as e:
        invdyn.load("hopper-medium-v1")
    msg = str(e.value)
    assert "Did you mean: hopper-medium-v2?" in msg and "Available: hopper-medium-v2." in msg
    assert "--datasets hopper-medium-v1 --download" in msg


def test_predict_on_read_only_memory_maps_warns_nothing(tmp_path):
    """Arrays from the Arrow cache are read-only memory maps; torch warns on those unless copied."""
    import warnings

    model = invdyn.read_model_dir(make_model_dir(tmp_path / "m"))
    obs = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    obs.tofile(tmp_path / "obs.bin")
    mapped = np.memmap(tmp_path / "obs.bin", dtype=np.float32, mode="r", shape=obs.shape)
    assert not mapped.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = model.predict(mapped, mapped[::-1])
        normalized = model.predict_normalized(mapped, mapped[::-1])
        tensor = model.predict(torch.from_numpy(obs), torch.from_numpy(obs[::-1].copy()))
    np.testing.assert_array_equal(raw, model.predict(obs, obs[::-1].copy()))
    np.testing.assert_array_equal(normalized, model.predict_normalized(obs, obs[::-1].copy()))
    np.testing.assert_array_equal(raw, tensor.numpy())


def test_tampered_cache_is_refused(tmp_path):
    invdyn.fetch(make_bundle(tmp_path, names=("a-v0",)))
    readme = model_cache_dir() / "a-v0" / "README.md"
    readme.write_text(readme.read_text() + "\nextra")
    with pytest.raises(invdyn.ChecksumError, match=r"README\.md.*force=True"):
        invdyn.load("a-v0")


def test_list_models_records(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    invdyn.fetch(bundle)
    broken = model_cache_dir() / "broken-v0"
    broken.mkdir()
    (broken / "params.json").write_text("[]")
    monkeypatch.setenv("HOME", str(CD_HOME))
    records = {r["name"]: r for r in invdyn.list_models()}
    assert set(records) == {"a-v0", "broken-v0", CD_NAME}
    assert records["a-v0"]["source"] == str(bundle.resolve()) and records["a-v0"]["error"] is None
    assert records["a-v0"]["metrics"]["heldout_mse"] == pytest.approx(0.01)
    assert "must be a JSON object" in records["broken-v0"]["error"]
    assert records[CD_NAME]["location"] == "CleanDiffuser" and records[CD_NAME]["path"] == str(CD_DIR)
    assert json.dumps(records)  # plain JSON-able records
    assert [r["name"] for r in invdyn.list_models(include_cleandiffuser=False)] == ["a-v0", "broken-v0"]


def test_load_from_mlflow_registry(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ours = make_model_dir(tmp_path / "a-v0", seed=4)
    client = MlflowClient()
    exp = client.create_experiment("idm", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(ours), artifact_path="model")  # the artifact is the model dir itself
        mlflow.log_artifacts(str(ours), artifact_path="packed/a-v0")  # ... or contains it
    client.create_registered_model("idm-a")
    for sub in ("model", "packed"):
        v = client.create_model_version(
            "idm-a", source=f"{run.info.artifact_uri}/{sub}", run_id=run.info.run_id
        )
    client.set_registered_model_alias("idm-a", "champion", v.version)
    direct = invdyn.load("a-v0", source="models:/idm-a/1")
    nested = invdyn.load("a-v0", source="models:/idm-a@champion")
    assert _same(direct, invdyn.read_model_dir(ours)) and _same(nested, direct)
    assert nested.source == "models:/idm-a@champion" and nested.path is None and "heldout_mse" in nested.card
    with pytest.raises(invdyn.ModelNotFoundError, match="MLflow could not download models:/idm-b/1"):
        invdyn.load("a-v0", source="models:/idm-b/1")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if MLflow were not installed
    monkeypatch.setitem(sys.modules, "mlflow.artifacts", None)
    with pytest.raises(invdyn.InvdynError, match="pip install mlflow"):
        invdyn.load("a-v0", source="models:/idm-a/1")


def test_import_is_light():
    code = (
        "import sys, numpy, torch; before = set(sys.modules); import invdyn; "
        "new = set(sys.modules) - before; "
        "heavy = ['ray', 'mlflow', 'gymnasium', 'h5py', 'pyarrow', 'pipeline', 'tqdm', 'matplotlib', "
        "'safetensors', 'onnx', 'onnxscript', 'onnxruntime', 'scipy']; "
        "print(sorted(m for m in heavy if m in new or (m != 'tqdm' and m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
