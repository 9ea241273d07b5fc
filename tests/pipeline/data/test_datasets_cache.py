"""The Arrow cache: built once per source content, memory-mapped, hit without opening the HDF5, rebuilt on
change."""

import os

import numpy as np

import pipeline.data.readers
from pipeline.data import cache
from pipeline.data.sources import load_transitions, prepare


def refuse_hdf5(path):
    """Stands in for pipeline.data.readers.open_hdf5: a load that succeeds with it never parsed the source."""
    raise AssertionError(f"HDF5 opened: {path}")


def test_second_load_is_a_cache_hit_that_never_opens_the_hdf5(d4rl_file, monkeypatch):
    n = 40
    qpos = np.random.default_rng(0).normal(size=(n, 4))
    path, _ = d4rl_file(episodes=(20, 20), **{"infos/qpos": qpos, "infos/qvel": qpos[:, :3]})
    first = load_transitions(str(path))
    assert first.stats["cache_hit"] is False
    assert cache.cache_path(first.sha256).is_file()
    with monkeypatch.context() as m:
        m.setattr(pipeline.data.readers, "open_hdf5", refuse_hdf5)
        second = load_transitions(str(path))
    assert second.stats["cache_hit"] is True and second.stats["cache"] == str(cache.cache_path(first.sha256))
    for key in ("obs", "act", "next_obs", "episode", "qpos", "qvel"):
        assert np.array_equal(getattr(first, key), getattr(second, key)), key
    assert second.obs.dtype == np.float32 and second.episode.dtype == np.int64
    # zero-copy views of the memory map: read-only, not owning their memory
    assert not second.obs.flags.writeable and not second.obs.flags.owndata
    assert second.stats["episodes"] == 2 and second.stats["sha256"] == first.sha256


def test_changed_source_rebuilds_the_cache(d4rl_file):
    path, _ = d4rl_file(seed=0)
    a = load_transitions(str(path))
    path, raw = d4rl_file(seed=1)  # same path, new content
    b = load_transitions(str(path))
    assert b.stats["cache_hit"] is False and b.sha256 != a.sha256
    np.testing.assert_array_equal(b.act, raw["actions"])
    assert cache.cache_path(a.sha256).is_file() and cache.cache_path(b.sha256).is_file()


def test_same_content_elsewhere_shares_the_cache(d4rl_file, tmp_path, monkeypatch):
    path, _ = d4rl_file()
    a = load_transitions(str(path))
    copy = tmp_path / "copy" / "renamed.h5"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(pipeline.data.readers, "open_hdf5", refuse_hdf5)
    b = load_transitions(str(copy))
    assert b.stats["cache_hit"] and b.sha256 == a.sha256
    assert b.name == "renamed" and b.stats["source"] == str(copy.resolve())


def test_damaged_cache_is_rebuilt(d4rl_file):
    path, raw = d4rl_file()
    info = prepare(str(path))
    cached = info["cache"]
    with open(cached, "r+b") as f:
        f.truncate(os.path.getsize(cached) // 2)
    t = load_transitions(str(path))
    assert t.stats["cache_hit"] is False
    np.testing.assert_array_equal(t.next_obs, raw["next_observations"])


def test_use_cache_false_writes_nothing(d4rl_file):
    path, _ = d4rl_file()
    t = load_transitions(str(path), use_cache=False)
    assert len(t) == 16 and "cache" not in t.stats
    assert not cache.cache_dir().exists() or not list(cache.cache_dir().glob("*.arrow"))


def test_unwritable_cache_folder_still_loads(d4rl_file, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where INVDYN_HOME should be a folder")
    monkeypatch.setenv("INVDYN_HOME", str(blocker))
    path, raw = d4rl_file()
    t = load_transitions(str(path))
    assert len(t) == 16 and "cache" not in t.stats
    assert "cannot write the dataset cache" in caplog.text
