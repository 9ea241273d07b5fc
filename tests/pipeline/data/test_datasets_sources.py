"""Source kinds: a new kind is one reader plus one registration; pipeline.sim adds the simulated sets."""

import subprocess
import sys

import numpy as np
import pytest

from pipeline.data import cache, sources
from pipeline.data.catalog import DatasetError
from pipeline.data.sources import KINDS, SourceKind, load_transitions, register_kind
from pipeline.data.transitions import make_transitions


def _read_npz(src, sha256):
    """A toy reader: an .npz of obs / act / next_obs rows, one episode."""
    with np.load(src.path) as z:
        obs, act, nxt = z["obs"], z["act"], z["next_obs"]
    done = np.zeros(len(obs), bool)
    done[-1] = True
    stats = {"format": "npz", "sha256": sha256 or "unhashed"}
    return make_transitions(
        src.name,
        str(src.path),
        obs,
        act,
        terminals=done,
        timeouts=np.zeros(len(obs), bool),
        next_obs=nxt,
        stats=stats,
    )


def test_a_registered_kind_reads_its_suffix_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "KINDS", dict(KINDS))  # the registration ends with the test
    register_kind("npz", SourceKind(read=_read_npz, cache_tag="npz", suffixes=(".npz",)))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(30, 4)).astype(np.float32)
    path = tmp_path / "toy.npz"
    np.savez(path, obs=obs, act=rng.normal(size=(30, 2)), next_obs=obs + 1)
    first = load_transitions(str(path))
    assert first.name == "toy" and len(first) == 30 and first.stats["cache_hit"] is False
    assert first.stats["cache"] == str(cache.cache_path(first.sha256, "npz"))
    second = load_transitions(str(path))
    assert second.stats["cache_hit"] is True and np.array_equal(second.next_obs, obs + 1)


def test_simulated_kind_is_registered_and_generates_a_missing_file(monkeypatch):
    assert KINDS["simulated"].make is not None and KINDS["simulated"].cache_tag == "hdf5"
    monkeypatch.setenv("INVDYN_SIM_TRANSITIONS", "1200")
    t = load_transitions("sim-hopper-ou-v0")
    assert len(t) == 1200 and t.stats["policy"] == "ou" and t.stats["cache_hit"] is False
    # the same file by path is the same source: same reader, same cache file
    again = load_transitions(t.stats["source"])
    assert again.stats["cache_hit"] is True and again.stats["cache"] == t.stats["cache"]


def test_a_kind_nobody_registered_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sources, "KINDS", {k: v for k, v in KINDS.items() if k != "simulated"})
    with pytest.raises(DatasetError, match="no source kind 'simulated' is registered.*pipeline.sim"):
        load_transitions("sim-hopper-random-v0")


def test_every_entry_point_has_the_simulated_kind_without_loading_mujoco():
    """A fresh interpreter that imports only pipeline.data generates sim-* files (pipeline/__init__ registers
    the kind), and importing the pipeline loads no gymnasium / MuJoCo."""
    code = (
        "import sys; from pipeline.data.sources import KINDS; "
        "print('simulated' in KINDS, 'gymnasium' in sys.modules or 'mujoco' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True", "False"], r.stderr
