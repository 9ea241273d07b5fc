"""Model directories and bundles written by an earlier invdyn (tests/fixtures/model_dir_v1: model.ckpt only)
load in this one with the same weights and outputs, directly, from a bundle and after being saved again."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.models import FIXTURES

import invdyn
from invdyn.settings import model_cache_dir

V1 = FIXTURES / "model_dir_v1"
MODELS = ["fancy-mlp-v1", "res-mlp-v1"]
#: outputs are compared to 1e-6, not bit for bit: another CPU's kernels may round a sum differently; the
#: weights themselves are compared exactly
TOL = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(V1 / "expected.npz"))


def _check_outputs(model, key, expected):
    np.testing.assert_allclose(
        model.predict(expected["obs"], expected["next_obs"]), expected[f"{key}_act"], **TOL
    )
    got = model.predict(expected["obs_h"], expected["next_obs_h"])
    assert got.shape == expected[f"{key}_act_h"].shape == (2, 3, 3)
    np.testing.assert_allclose(got, expected[f"{key}_act_h"], **TOL)
    np.testing.assert_allclose(
        model.predict_normalized(expected["obs"], expected["next_obs"]),
        expected[f"{key}_act_normalized"],
        **TOL,
    )


@pytest.mark.parametrize("name", MODELS)
def test_a_v1_directory_loads_with_the_same_weights_and_outputs(name, expected, tmp_path):
    src = V1 / name
    assert sorted(p.name for p in src.iterdir()) == ["model.ckpt", "params.json"]
    assert set(json.loads((src / "params.json").read_text())["weights"]) == {"file", "sha256"}
    d = shutil.copytree(src, tmp_path / name)  # read from a copy: nothing may be written into the fixture
    model = invdyn.read_model_dir(d)
    stored = torch.load(src / "model.ckpt", weights_only=True)["state_dict"]
    own = model.net.state_dict()
    assert sorted(own) == sorted(stored) and all(torch.equal(own[k], stored[k]) for k in stored)
    _check_outputs(model, name.replace("-", "_"), expected)
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in src.iterdir())


@pytest.mark.parametrize("name", MODELS)
def test_a_v1_model_saved_again_gains_safetensors_and_answers_the_same(name, expected, tmp_path):
    old = invdyn.read_model_dir(V1 / name)
    params = old.params
    new = invdyn.save_model_dir(
        tmp_path / name,
        old.net,
        old.normalizer,
        name=params["name"],
        dataset=params["dataset"],
        metrics=params["metrics"],
        training=params["training"],
        learning_curve=params["learning_curve"],
    )
    assert (new / "model.safetensors").is_file()
    again = invdyn.read_model_dir(new)
    key = name.replace("-", "_")
    np.testing.assert_array_equal(
        again.predict(expected["obs"], expected["next_obs"]),
        old.predict(expected["obs"], expected["next_obs"]),
    )
    _check_outputs(again, key, expected)


def test_a_v1_bundle_installs_and_loads(expected):
    manifest = invdyn.verify_bundle(V1 / "bundle-v1.zip")
    assert all(sorted(m["files"]) == ["README.md", "model.ckpt", "params.json"] for m in manifest["models"])
    assert sorted(invdyn.fetch(V1 / "bundle-v1.zip", progress=False)) == MODELS
    for name in MODELS:
        model = invdyn.load(name)
        assert model.source == "invdyn cache" and model.path == model_cache_dir() / name
        _check_outputs(model, name.replace("-", "_"), expected)
