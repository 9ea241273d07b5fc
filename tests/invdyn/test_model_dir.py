"""The model directory: our round trip, CleanDiffuser's real checkpoint, and CleanDiffuser reading ours."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers.models import CD_DIR, CD_HOME, CD_NAME, make_model_dir

import invdyn
from invdyn import FancyMlpInvDynamic
from invdyn._files import sha256_file


class CleanDiffuserFancyMlpInvDynamic(nn.Module):
    """Re-creation of CleanDiffuser's class and of its `from_pretrained` steps (json config, torch.load)."""

    def __init__(
        self,
        obs_dim,
        act_dim,
        hidden_dim=256,
        tanh_out_activation=True,
        action_scale=1.0,
        add_norm=False,
        add_dropout=False,
    ):
        super().__init__()
        self.action_scale = action_scale
        self.tanh_out_activation = tanh_out_activation
        self.mlp = nn.Sequential(
            nn.Linear(2 * obs_dim, hidden_dim),
            nn.LayerNorm(hidden_dim) if add_norm else nn.Identity(),
            nn.GELU(approximate="tanh"),
            nn.Dropout(0.1) if add_dropout else nn.Identity(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim) if add_norm else nn.Identity(),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_dim, act_dim),
            nn.Tanh() if tanh_out_activation else nn.Identity(),
        )

    def forward(self, o, o_next):
        out = self.mlp(torch.cat([o, o_next], -1))
        return out * self.action_scale if self.tanh_out_activation else out

    @classmethod
    def from_pretrained(cls, env_name):
        path = os.path.expanduser("~") + "/.CleanDiffuser/pretrained/invdyn/" + env_name + "/"
        ckpt_path = path + next(f for f in os.listdir(path) if ".ckpt" in f)
        with open(path + "params.json") as f:
            params = json.load(f)
        model = cls(**params["config"])
        model.load_state_dict(torch.load(ckpt_path, map_location="cpu")["state_dict"])
        return model.eval(), params


def test_round_trip_and_params(tmp_path):
    d = make_model_dir(tmp_path / "sim-hopper-random-v0", obs_dim=11, act_dim=3, seed=3)
    params = json.loads((d / "params.json").read_text())
    assert params["dataset"]["name"] == "sim-hopper-random-v0" and len(params["dataset"]["sha256"]) == 64
    assert params["metrics"]["heldout_mse"] == pytest.approx(3.01) and "baseline_mse" in params["metrics"]
    assert params["weights"]["file"] == "model.ckpt"
    assert params["weights"]["safetensors"] == {
        "file": "model.safetensors",
        "sha256": sha256_file(d / "model.safetensors"),
    }
    assert sorted(p.name for p in d.iterdir()) == [
        "README.md",
        "model.ckpt",
        "model.safetensors",
        "params.json",
    ]
    model = invdyn.read_model_dir(d)
    assert not model.training and model.card == (d / "README.md").read_text()
    assert "heldout_mse" in model.card and "invdyn.load" in model.card
    rng = np.random.default_rng(0)
    obs, nxt = rng.normal(size=(8, 11)), rng.normal(size=(8, 11))
    normed = model.predict_normalized(model.normalizer.normalize(obs), model.normalizer.normalize(nxt))
    np.testing.assert_allclose(model.predict(obs, nxt), normed, atol=1e-6)
    # predict normalizes with the stored mean/std: (x - mean) / std by hand gives the same
    mean, std = (
        np.array(params["normalizers"]["state"]["mean"]),
        np.array(params["normalizers"]["state"]["std"]),
    )
    by_hand = model.predict_normalized((obs - mean) / std, (nxt - mean) / std)
    np.testing.assert_allclose(model.predict(obs, nxt), by_hand, atol=1e-5)


def test_cleandiffuser_fixture_reproduces_its_outputs():
    expected = np.load(CD_HOME / f"{CD_NAME}.expected.npz")
    model = invdyn.load(CD_NAME, source=CD_DIR)
    assert not model.training
    np.testing.assert_allclose(
        model.predict_normalized(expected["obs"], expected["next_obs"]), expected["act"], atol=1e-6
    )
    t = model.predict_normalized(torch.from_numpy(expected["obs"]), torch.from_numpy(expected["next_obs"]))
    np.testing.assert_allclose(t.numpy(), expected["act"], atol=1e-6)


def test_from_pretrained_reads_cleandiffuser_home(monkeypatch):
    monkeypatch.setenv("HOME", str(CD_HOME))
    expected = np.load(CD_HOME / f"{CD_NAME}.expected.npz")
    net, params = FancyMlpInvDynamic.from_pretrained(CD_NAME)
    assert isinstance(net, FancyMlpInvDynamic) and not net.training
    assert params["config"]["obs_dim"] == 11
    np.testing.assert_allclose(net.predict(expected["obs"], expected["next_obs"]), expected["act"], atol=1e-6)
    # and plain invdyn.load finds it as the last place it looks
    assert invdyn.load(CD_NAME).source == "CleanDiffuser"
    with pytest.raises(invdyn.ModelNotFoundError, match="walker2d-medium-v2"):
        FancyMlpInvDynamic.from_pretrained("walker2d-medium-v2")  # raises; never returns (None, None)


def test_our_directory_loads_through_cleandiffusers_steps(tmp_path, monkeypatch):
    ours = make_model_dir(tmp_path / "hopper-medium-v2", obs_dim=11, act_dim=3, hidden_dim=32)
    home = tmp_path / "home"
    shutil.copytree(ours, home / ".CleanDiffuser" / "pretrained" / "invdyn" / "hopper-medium-v2")
    monkeypatch.setenv("HOME", str(home))
    theirs, params = CleanDiffuserFancyMlpInvDynamic.from_pretrained("hopper-medium-v2")
    assert (
        params["normalizers"]["state"]["mean"]
        == json.loads((ours / "params.json").read_text())["normalizers"]["state"]["mean"]
    )
    loaded = invdyn.read_model_dir(ours)
    x = torch.randn(5, 4, 11)
    with torch.no_grad():
        np.testing.assert_allclose(
            theirs(x, x * 0.5).numpy(), loaded.predict_normalized(x, x * 0.5).numpy(), atol=1e-6
        )
    net, _ = FancyMlpInvDynamic.from_pretrained("hopper-medium-v2")  # the drop-in reads the copied dir too
    np.testing.assert_allclose(net.predict(x, x).numpy(), loaded.predict_normalized(x, x).numpy(), atol=1e-6)


def test_weights_not_fitting_params_name_both_shapes(tmp_path):
    d = make_model_dir(tmp_path / "m", obs_dim=5, act_dim=2, hidden_dim=16)
    params = json.loads((d / "params.json").read_text())
    params["config"]["hidden_dim"] = 32
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(invdyn.ShapeError) as e:
        invdyn.read_model_dir(d)
    assert "(16, 10)" in str(e.value) and "(32, 10)" in str(e.value) and "mlp.0.weight" in str(e.value)
    params["config"].update(hidden_dim=16, add_norm=False)
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(invdyn.ShapeError, match="unexpected keys.*mlp.1.bias"):
        invdyn.read_model_dir(d)


def test_damaged_directories_give_clear_errors(tmp_path):
    d = make_model_dir(tmp_path / "m")
    recorded = json.loads((d / "params.json").read_text())["weights"]["sha256"]
    ckpt = d / "model.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(invdyn.ChecksumError) as e:
        invdyn.read_model_dir(d)
    assert str(ckpt) in str(e.value) and recorded in str(e.value)
    ckpt.unlink()
    with pytest.raises(invdyn.ModelNotFoundError, match="model.ckpt"):
        invdyn.read_model_dir(d)
    (d / "params.json").write_text("{not json")
    with pytest.raises(invdyn.FormatError, match=r"params\.json is not valid JSON"):
        invdyn.read_model_dir(d)
    (d / "params.json").write_text(json.dumps({"config": {"obs_dim": 5}, "format_version": 7}))
    with pytest.raises(invdyn.FormatError, match="format_version 7.*upgrade"):
        invdyn.read_model_dir(d)


def _record(d, **weights):
    params = json.loads((d / "params.json").read_text())
    params["weights"].update(weights)
    params["weights"] = {k: v for k, v in params["weights"].items() if v is not None}
    (d / "params.json").write_text(json.dumps(params))


def test_safetensors_is_read_by_preference_and_both_files_hold_the_same_tensors(tmp_path):
    from safetensors.torch import load_file

    d = make_model_dir(tmp_path / "m", obs_dim=7, act_dim=3, hidden_dim=16)
    from_ckpt = torch.load(d / "model.ckpt", weights_only=True)["state_dict"]
    from_st = load_file(d / "model.safetensors")
    assert sorted(from_ckpt) == sorted(from_st)
    assert all(torch.equal(from_ckpt[k], from_st[k]) for k in from_ckpt)
    x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    before = invdyn.read_model_dir(d).predict(x, x)
    # a checkpoint whose weights differ (checksum re-recorded): invdyn still answers from model.safetensors
    torch.save({"state_dict": {k: v + 1.0 for k, v in from_ckpt.items()}}, d / "model.ckpt")
    _record(d, sha256=sha256_file(d / "model.ckpt"))
    np.testing.assert_array_equal(invdyn.read_model_dir(d).predict(x, x), before)
    # the same directory without the safetensors entry reads the checkpoint
    _record(d, safetensors=None)
    assert not np.allclose(invdyn.read_model_dir(d).predict(x, x), before)


def test_every_weights_file_named_must_be_there_and_match(tmp_path):
    d = make_model_dir(tmp_path / "m")
    st = d / "model.safetensors"
    recorded = json.loads((d / "params.json").read_text())["weights"]["safetensors"]["sha256"]
    good = st.read_bytes()
    st.write_bytes(good[:-3])
    with pytest.raises(invdyn.ChecksumError) as e:
        invdyn.read_model_dir(d)
    assert str(st) in str(e.value) and recorded in str(e.value)
    st.unlink()
    with pytest.raises(invdyn.ModelNotFoundError, match="model.safetensors"):
        invdyn.read_model_dir(d)
    st.write_bytes(good)
    (d / "model.ckpt").write_bytes(b"not the checkpoint")  # checked although safetensors is what is parsed
    with pytest.raises(invdyn.ChecksumError, match="model.ckpt"):
        invdyn.read_model_dir(d)


def test_extra_files_may_not_take_the_weights_names(tmp_path):
    net = FancyMlpInvDynamic(3, 1, hidden_dim=8)
    norm = invdyn.GaussianNormalizer(np.zeros(3), np.ones(3))
    for name in ("model.safetensors", "model.ckpt", "params.json"):
        with pytest.raises(invdyn.FormatError, match=name):
            invdyn.save_model_dir(tmp_path / "m", net, norm, files={name: b"x"})


class Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    src = Path(CD_DIR)
    d = tmp_path / "pickled"  # not "evil": test_hostile_bundles looks for that name anywhere under tmp
    shutil.copytree(src, d)
    ckpt = next(d.glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    marker = tmp_path / "pwned"
    torch.save({"state_dict": state, "hook": Payload(marker)}, ckpt)
    with pytest.raises(invdyn.FormatError, match="not a readable torch checkpoint"):
        invdyn.read_model_dir(d)
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # proof the payload is live: full unpickling runs it
    assert marker.exists()
