"""Replaying recorded MuJoCo states: the reset is exact, windows stay inside episodes, bad data is
reported."""

import dataclasses

import numpy as np
import pytest

from pipeline.data.sources import load_transitions
from pipeline.data.transitions import Transitions
from pipeline.sim.physics import Replay, physics_metrics, successor_mask, window_starts


@pytest.fixture(scope="module")
def cheetah(sim_files):
    return load_transitions(str(sim_files["sim-halfcheetah-random-v0"]))


@pytest.fixture(scope="module")
def hopper(sim_files):
    return load_transitions(str(sim_files["sim-hopper-random-v0"]))


def _zeros(t):
    return lambda obs, nxt: np.zeros((len(obs), t.act_dim))


def _metrics(t, allowed=None, **kw):
    std = t.obs.std(0) + 1e-8
    allowed = np.ones(len(t), bool) if allowed is None else allowed
    kw = {"one_step_samples": 300, "tracking_starts": 8, "horizon": 16, "seed": 0, **kw}
    return physics_metrics(t, _zeros(t), std, t.act.mean(0), allowed, **kw)


@pytest.mark.parametrize("name", ["cheetah", "hopper"])
def test_recorded_actions_replay_at_floating_point_level(name, request):
    """Reset to the recorded state + the recorded action reproduces the recorded next state to ~1e-12."""
    t = request.getfixturevalue(name)
    m = _metrics(t)
    assert m["physics_reason"] is None
    assert m["env_id"] == t.stats["env_id"]
    assert m["reference"].startswith("env observation")
    assert m["one_step_floor"] < 1e-8
    assert m["tracking_floor"] < 1e-8  # 16 steps open loop with the recorded actions: still exact
    assert len(m["floor_drift_per_step"]) == 16
    # the same comparison is sensitive: a zero / mean action lands far from the recorded next state
    assert m["one_step_error"] > 1e-3 and m["one_step_baseline"] > 1e-3
    assert m["tracking_baseline"] > 1e-2


def test_wrong_state_is_detected(cheetah):
    """If the simulator were not put into the recorded state, the floor would be far from zero."""
    shifted = dataclasses.replace(cheetah, qvel=np.roll(cheetah.qvel, 1, axis=0))
    m = _metrics(shifted, tracking_starts=2, horizon=2)
    assert m["reference"] == "recorded next_obs"  # the states no longer explain the observations
    assert m["one_step_floor"] > 1e-2


def test_observation_of_recorded_state_matches_recorded_observation(cheetah):
    replay = Replay(cheetah)
    rows = np.arange(0, len(cheetah), 97)
    np.testing.assert_allclose(replay.observe(rows), cheetah.obs[rows], rtol=1e-6, atol=1e-5)
    replay.close()


def test_windows_never_cross_an_episode_end():
    episode = np.repeat([0, 1, 2], [5, 3, 6])
    obs = np.arange(len(episode), dtype=np.float32)[:, None]
    nxt = obs + 1
    t = Transitions("x", obs, np.zeros((len(obs), 1), np.float32), nxt, episode)
    succ = successor_mask(t)
    assert succ.tolist() == [1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0]
    starts = window_starts(succ, np.ones(len(obs), bool), horizon=3)
    assert starts.tolist() == [0, 1, 8, 9, 10]  # rows i..i+3 all inside one episode
    allowed = episode == 2
    assert window_starts(succ, allowed, horizon=3).tolist() == [8, 9, 10]
    # a gap inside an episode (a dropped row) also breaks the chain
    nxt[9] += 0.5
    assert 9 not in window_starts(successor_mask(t), np.ones(len(obs), bool), horizon=1)


def test_unsimulatable_data_gives_a_reason_not_a_crash(cheetah):
    no_state = dataclasses.replace(cheetah, qpos=None, qvel=None)
    m = _metrics(no_state)
    assert m["one_step_error"] is None and m["tracking_drift"] is None
    assert "infos/qpos" in m["physics_reason"]

    unknown = dataclasses.replace(cheetah, name="my-robot-data", stats={})
    m = _metrics(unknown)
    assert m["tracking_drift"] is None and "no known Gymnasium environment" in m["physics_reason"]

    wrong_env = dataclasses.replace(cheetah, stats={**cheetah.stats, "env_id": "Hopper-v5"})
    m = _metrics(wrong_env)
    assert m["one_step_error"] is None
    assert "obs_dim 17 vs 11" in m["physics_reason"] and "Hopper-v5" in m["physics_reason"]


def test_short_episodes_give_one_step_but_no_tracking(hopper):
    m = _metrics(hopper, horizon=5000)
    assert m["one_step_floor"] < 1e-8
    assert m["tracking_drift"] is None and "5001 consecutive" in m["physics_reason"]


def test_zero_padded_observations_like_d4rl_ant_replay(tmp_path):
    """D4RL's ant: Ant-v5's 27 dims (no contact forces) then 84 zeros; the env's obs is padded to match."""
    from pipeline.sim.simulate import simulate

    t = load_transitions(
        str(simulate("sim-ant-random-v0", transitions=400, out_dir=tmp_path, workers=1, progress=False))
    )
    assert t.obs_dim == 27
    pad = lambda x: np.concatenate([x, np.zeros((len(x), 84), np.float32)], 1)  # noqa: E731
    d4rl_like = dataclasses.replace(
        t, name="ant-medium-v2", obs=pad(t.obs), next_obs=pad(t.next_obs), stats={}
    )
    m = _metrics(d4rl_like, horizon=4)
    assert m["physics_reason"] is None and m["env_id"] == "Ant-v5"
    assert m["one_step_floor"] < 1e-8 < m["one_step_baseline"]
    # a non-zero extra dim is not padding: refused with both dims named
    bad = d4rl_like.obs.copy()
    bad[:, -1] = 1.0
    m = _metrics(dataclasses.replace(d4rl_like, obs=bad))
    assert m["one_step_error"] is None and "obs_dim 111 vs 27" in m["physics_reason"]
