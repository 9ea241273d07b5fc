"""Readers on real files written with h5py / pyarrow: pairing, dtypes, boundaries and every bad input."""

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.catalog import CATALOG, DatasetError, DatasetMissingError, UnknownDatasetError, file_path
from pipeline.data.readers import read_hdf5, read_parquet
from pipeline.data.sources import load_transitions
from pipeline.data.transitions import MAX_NONFINITE_FRACTION, make_transitions


def assert_within_episodes(t):
    """Every pair stays inside one planted episode and advances exactly one step."""
    assert np.array_equal(t.next_obs[:, 0], t.obs[:, 0])
    assert np.array_equal(t.next_obs[:, 1], t.obs[:, 1] + 1)
    # the episode ids follow the planted episodes one to one
    assert np.array_equal(
        np.unique(t.episode, return_inverse=True)[1], np.unique(t.obs[:, 0], return_inverse=True)[1]
    )


def test_next_observations_are_used_and_every_row_is_a_pair(d4rl_file):
    path, raw = d4rl_file(episodes=(5, 7, 4))
    t = read_hdf5(path)
    assert len(t) == 16 and t.stats["episodes"] == 3
    assert np.array_equal(t.next_obs, raw["next_observations"])
    assert_within_episodes(t)
    assert t.obs.dtype == t.act.dtype == t.next_obs.dtype == np.float32
    assert t.stats["act_min"] == raw["actions"].min(0).tolist() and len(t.stats["act_max"]) == 2


def test_without_next_observations_no_pair_crosses_a_boundary(d4rl_file):
    # terminals on episode 0, timeouts on 1 and 2: neither may produce a pair into the next episode
    path, raw = d4rl_file(episodes=(5, 7, 4, 6), next_obs=False, terminal_episodes=(0, 2))
    t = read_hdf5(path)
    assert len(t) == sum((5, 7, 4, 6)) - 4  # the last step of each episode has no successor
    assert_within_episodes(t)
    assert t.stats["episodes"] == 4 and not t.stats["has_next_observations"]
    rows = np.flatnonzero(~(raw["terminals"] | raw["timeouts"]))
    assert np.array_equal(t.next_obs, raw["observations"][rows + 1])


def test_float64_file_is_read_as_float32(d4rl_file):
    path, raw = d4rl_file(dtype="float64", next_obs=False)
    t = read_hdf5(path)
    assert raw["observations"].dtype == np.float64
    assert t.obs.dtype == t.act.dtype == t.next_obs.dtype == np.float32
    np.testing.assert_allclose(t.act, raw["actions"][~(raw["terminals"] | raw["timeouts"])], rtol=1e-6)


def test_missing_timeouts_cut_episodes_like_d4rl(d4rl_file):
    # one 2500-step run without terminals or timeouts: d4rl cuts it every 1000 steps
    path, _ = d4rl_file(episodes=(2500,), next_obs=False, timeouts=False, terminal_episodes=())
    t = read_hdf5(path)
    assert t.stats["timeouts_inferred"] and t.stats["episodes"] == 3
    assert len(t) == 2500 - 3
    assert not np.isin([999, 1999], t.obs[:, 1]).any()


def test_qpos_qvel_follow_the_pairs(d4rl_file):
    n = 16
    qpos, qvel = np.arange(n * 2.0).reshape(n, 2), -np.arange(n * 3.0).reshape(n, 3)
    path, raw = d4rl_file(next_obs=False, **{"infos/qpos": qpos, "infos/qvel": qvel})
    t = read_hdf5(path)
    rows = np.flatnonzero(~(raw["terminals"] | raw["timeouts"]))
    assert np.array_equal(t.qpos, qpos[rows]) and np.array_equal(t.qvel, qvel[rows])


def test_nonfinite_rows_are_dropped_and_counted(d4rl_file):
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(1000, 3)).astype(np.float32)
    obs[10, 2] = np.nan
    path, _ = d4rl_file(episodes=(1000,), observations=obs)
    t = read_hdf5(path)
    assert len(t) == 999 and t.stats["dropped_nonfinite"] == 1
    assert np.isfinite(t.obs).all()


def test_too_many_nonfinite_rows_are_refused(d4rl_file):
    n = 200
    act = np.zeros((n, 2), np.float32)
    act[: int(n * MAX_NONFINITE_FRACTION) + 3, 1] = np.inf
    path, _ = d4rl_file(episodes=(n,), actions=act)
    with pytest.raises(DatasetError, match=r"NaN/inf.*actions") as e:
        read_hdf5(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key", ["observations", "actions", "terminals"])
def test_missing_key_names_file_and_key(d4rl_file, key):
    path, _ = d4rl_file(**{key: None})
    with pytest.raises(DatasetError, match=f"missing key '{key}'") as e:
        read_hdf5(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key", ["actions", "timeouts", "next_observations"])
def test_lengths_that_disagree(d4rl_file, key):
    path, raw = d4rl_file()
    with h5py.File(path, "a") as f:
        del f[key]
        f.create_dataset(key, data=raw[key][:-2])
    with pytest.raises(DatasetError, match=f"key '{key}' has 14 rows but 'observations' has 16"):
        read_hdf5(path)


def test_empty_data(d4rl_file):
    path, _ = d4rl_file(episodes=(0,), terminal_episodes=())
    with pytest.raises(DatasetError, match="empty"):
        read_hdf5(path)
    one_step, _ = d4rl_file(name="one.hdf5", episodes=(1, 1), next_obs=False)
    with pytest.raises(DatasetError, match="no transitions"):
        read_hdf5(one_step)


def test_dims_contradicting_the_catalog(d4rl_file):
    name = "hopper-medium-v2"  # 11 / 3 in the catalog
    dest = file_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    d4rl_file(name="x.hdf5", obs_dim=17)[0].rename(dest)
    with pytest.raises(
        DatasetError, match=r"'observations' has 17 values per row but hopper-medium-v2 has 11"
    ):
        load_transitions(name)
    assert CATALOG[name]["obs_dim"] == 11


def test_truncated_and_non_hdf5_files(d4rl_file, tmp_path):
    path, _ = d4rl_file(episodes=(400, 400))
    data = path.read_bytes()
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        load_transitions(str(cut))
    assert str(cut) in str(e.value)
    text = tmp_path / "notes.h5"
    text.write_text("<html>404 not found</html>")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        load_transitions(str(text))


def test_unknown_name_suggests_nearest():
    with pytest.raises(UnknownDatasetError, match="Did you mean: walker2d-medium-expert-v2"):
        load_transitions("walker2d-medium-expert-v3")
    with pytest.raises(DatasetMissingError, match="does not exist"):
        load_transitions("/no/such/file.hdf5")


def test_missing_d4rl_file_names_url_and_path():
    with pytest.raises(DatasetMissingError) as e:
        load_transitions("halfcheetah-medium-replay-v2")
    msg = str(e.value)
    assert (
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5"
        in msg
    )
    assert str(file_path("halfcheetah-medium-replay-v2")) in msg


def _write_parquet(path, obs, act, nxt, episode):
    pq.write_table(
        pa.table({"obs": list(obs), "act": list(act), "next_obs": list(nxt), "episode": pa.array(episode)}),
        path,
    )


def test_parquet_pairs(tmp_path):
    rng = np.random.default_rng(0)
    obs, act, nxt = rng.normal(size=(30, 4)), rng.normal(size=(30, 2)), rng.normal(size=(30, 4))
    episode = np.repeat([7, 3, 9], 10)
    path = tmp_path / "mine.parquet"
    _write_parquet(path, obs, act, nxt, episode)
    t = load_transitions(str(path))
    assert t.name == "mine" and len(t) == 30 and t.stats["episodes"] == 3
    np.testing.assert_allclose(t.next_obs, nxt.astype(np.float32))
    assert np.array_equal(np.unique(t.episode[:10]), [0]) and t.episode[-1] == 2


def test_parquet_bad_inputs(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"obs": [[1.0, 2.0]], "act": [[1.0]]}), path)
    with pytest.raises(DatasetError, match="missing column.*next_obs, episode"):
        read_parquet(path)
    _write_parquet(path, [[1.0, 2.0], [1.0]], [[0.0], [0.0]], [[1.0, 2.0], [3.0, 4.0]], [0, 0])
    with pytest.raises(DatasetError, match="'obs' has rows of different lengths"):
        read_parquet(path)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="not a readable Parquet"):
        read_parquet(garbage)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=10),
    ends=st.lists(st.sampled_from(["terminal", "timeout", "both", "none"]), min_size=10, max_size=10),
    with_next=st.booleans(),
)
def test_no_pair_ever_crosses_a_planted_boundary(lengths, ends, with_next):
    """Any episode lengths and end flags: pairs stay inside episodes and every in-episode step is paired."""
    n = sum(lengths)
    ep = np.repeat(np.arange(len(lengths)), lengths)
    step = np.concatenate([np.arange(k) for k in lengths])
    obs = np.stack([ep, step, np.zeros(n)], 1).astype(np.float32)
    nxt = obs + np.array([0, 1, 0], np.float32)
    term, tout = np.zeros(n, bool), np.zeros(n, bool)
    last = np.cumsum(lengths) - 1
    for e, row in enumerate(last[:-1]):  # the final episode simply runs to the end of the file
        term[row] = ends[e] in ("terminal", "both")
        tout[row] = ends[e] in ("timeout", "both", "none")  # every boundary is flagged somehow
    expected = n if with_next else n - len(lengths)  # without next_observations the last step has no pair
    args = ("prop", "prop", obs, np.zeros((n, 1)))
    kw = {"terminals": term, "timeouts": tout, "next_obs": nxt if with_next else None}
    if expected == 0:
        with pytest.raises(DatasetError, match="no transitions"):
            make_transitions(*args, **kw)
        return
    t = make_transitions(*args, **kw)
    assert np.array_equal(t.next_obs[:, 0], t.obs[:, 0]) and np.array_equal(t.next_obs[:, 1], t.obs[:, 1] + 1)
    assert len(t) == expected
    assert t.stats["episodes"] == sum(1 for k in lengths if with_next or k > 1)
