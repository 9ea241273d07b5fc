"""The team remote: `load(name)` on a cache miss installs from INVDYN_REMOTE / `invdyn.configure` (a bundle
URL on a loopback server, pinned or not, resumed when cut; a directory of bundles), and offline touches no
network; a miss names the command that trains the model."""

import hashlib
import os

import numpy as np
import pytest
from helpers.models import FileServer, make_bundle, make_model_dir

import invdyn
from invdyn.settings import invdyn_home, model_cache_dir


@pytest.fixture(autouse=True)
def no_configured_remote():
    invdyn.configure()
    yield
    invdyn.configure()  # configure is process-wide: leave the environment in charge for the next test


@pytest.fixture
def served(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0", "b-v0"))
    with FileServer(tmp_path) as server:
        yield server, bundle, hashlib.sha256(bundle.read_bytes()).hexdigest()


def _predicts(model):
    x = np.zeros((2, model.obs_dim), np.float32)
    assert model.predict(x, x).shape == (2, model.act_dim)


def test_a_cache_miss_installs_from_the_remote_bundle_url(served, monkeypatch):
    server, _, _ = served
    monkeypatch.setenv("INVDYN_REMOTE", server.url("bundle.zip"))
    model = invdyn.load("b-v0")
    assert model.source == server.url("bundle.zip") and model.path == model_cache_dir() / "b-v0"
    _predicts(model)
    assert sorted(p.name for p in model_cache_dir().iterdir() if not p.name.startswith(".")) == [
        "a-v0",
        "b-v0",
    ]
    asked = len(server.requests)
    assert invdyn.load("a-v0").source == "invdyn cache"  # the bundle brought both: no second download
    assert len(server.requests) == asked == 1


def test_a_pin_is_checked_before_anything_is_installed(served, monkeypatch):
    server, _, sha = served
    monkeypatch.setenv("INVDYN_REMOTE", f"{server.url('bundle.zip')}#sha256={'0' * 64}")
    with pytest.raises(invdyn.ChecksumError, match="0" * 64):
        invdyn.load("b-v0")
    assert not model_cache_dir().exists() or not list(model_cache_dir().glob("*-v0"))
    assert not [p for p in (invdyn_home() / "downloads").iterdir() if not p.name.startswith(".")]
    invdyn.configure(remote=server.url("bundle.zip"), sha256=sha)  # configure wins over the environment
    assert invdyn.load("b-v0").name == "b-v0"


def test_a_cut_download_is_resumed(served, monkeypatch):
    server, bundle, sha = served
    server.cut_after, server.cuts = bundle.stat().st_size // 3, 1
    invdyn.configure(remote=server.url("bundle.zip"), sha256=sha)
    _predicts(invdyn.load("a-v0"))
    assert [rng for _, rng in server.requests] == [None, f"bytes={bundle.stat().st_size // 3}-"]


def test_offline_touches_no_network(served, monkeypatch):
    server, _, _ = served
    monkeypatch.setenv("INVDYN_REMOTE", server.url("bundle.zip"))
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    with pytest.raises(invdyn.ModelNotFoundError, match="INVDYN_OFFLINE=1 keeps invdyn from installing it"):
        invdyn.load("a-v0")
    assert server.requests == []


def test_a_known_dataset_the_remote_lacks_says_which_command_trains_it(served, monkeypatch):
    server, _, sha = served
    monkeypatch.setenv("INVDYN_REMOTE", server.url("bundle.zip"))
    with pytest.raises(invdyn.ModelNotFoundError) as e:
        invdyn.load("hopper-medium-v2")
    msg = str(e.value)
    assert (
        f"The team remote {server.url('bundle.zip')} has no model 'hopper-medium-v2'; it holds: a-v0, b-v0"
        in msg
    )
    assert "python -m pipeline.pretrain_all --datasets hopper-medium-v2 --download --export" in msg
    # pinned, the installed bundle's manifest answers: no download for a name it does not hold
    asked = len(server.requests)
    invdyn.configure(remote=server.url("bundle.zip"), sha256=sha)
    with pytest.raises(invdyn.ModelNotFoundError, match=f"sha256 {sha}\\) has no model 'hopper-medium-v2'"):
        invdyn.load("hopper-medium-v2")
    assert len(server.requests) == asked


def test_a_directory_of_bundles(tmp_path, monkeypatch):
    remote = tmp_path / "team"
    remote.mkdir()
    old = invdyn.write_bundle(remote / "old.zip", [make_model_dir(tmp_path / "v1" / "a-v0", seed=1)])
    new = invdyn.write_bundle(remote / "new.zip", [make_model_dir(tmp_path / "v2" / "a-v0", seed=2)])
    invdyn.write_bundle(remote / "other.zip", [make_model_dir(tmp_path / "v2" / "c-v0")])
    (remote / "broken.zip").write_bytes(b"not a zip")
    os.utime(old, (1_000_000_000, 1_000_000_000))  # the newest bundle holding a name is the one installed
    monkeypatch.setenv("INVDYN_REMOTE", str(remote))
    model = invdyn.load("a-v0")
    assert model.source == str(remote) and model.metrics["heldout_mse"] == pytest.approx(2.01)
    assert invdyn.load("c-v0").name == "c-v0"
    with pytest.raises(
        invdyn.ModelNotFoundError, match=r"No bundle in the team remote .* holds it \(1 unreadable"
    ):
        invdyn.load("walker2d-medium-v2")
    assert new.is_file()


def test_settings_that_name_no_usable_remote(tmp_path, monkeypatch):
    for setting, match in [
        (str(tmp_path / "nowhere"), "neither a bundle URL, a .zip nor a directory"),
        ("ftp://host/bundle.zip", "only an http"),
        ("http://127.0.0.1:9/b.zip#sha256=xyz", "not 64 hex digits"),
        ("http://127.0.0.1:9/b.zip#md5=00", "the only fragment understood"),
    ]:
        monkeypatch.setenv("INVDYN_REMOTE", setting)
        with pytest.raises(invdyn.FormatError, match=match):
            invdyn.load("a-v0")
    invdyn.configure(remote="")  # off, whatever the environment says
    with pytest.raises(invdyn.ModelNotFoundError, match="No models are installed"):
        invdyn.load("a-v0")
