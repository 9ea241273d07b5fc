"""The simulator-in-the-loop IDM oracle (bench/studies/idm_floor.py) on real MuJoCo: it recovers recorded
actions exactly from the recorded state, and its greedy closed loop tracks far better than the mean action."""

import importlib.util

import numpy as np
import pytest
from helpers.paths import REPO

from invdyn.normalizer import GaussianNormalizer
from pipeline.data.sources import load_transitions
from pipeline.sim.physics import Replay, seeded_sample, window_starts

_spec = importlib.util.spec_from_file_location("idm_floor", REPO / "bench" / "studies" / "idm_floor.py")
idm_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(idm_floor)


@pytest.fixture(scope="module")
def cheetah(sim_files):
    t = load_transitions(str(sim_files["sim-halfcheetah-random-v0"]))
    replay = Replay(t)
    std = GaussianNormalizer.from_data(t.obs).std[: replay.env_obs_dim]
    yield t, replay, std, idm_floor.Oracle(replay, std)
    replay.close()


def test_oracle_recovers_the_recorded_action_from_the_recorded_state(cheetah):
    t, replay, std, oracle = cheetah
    rows = seeded_sample(np.flatnonzero(replay.successor), 12, seed=0, stream=0)
    result = idm_floor.identifiability(replay, oracle, rows, std, restarts=3, seed=0, progress=False)
    full = result["summary"]["all"]["full"]
    # a miss is a local minimum at a contact switch, never a wrong "exact" answer
    assert full["solved"] >= 2 / 3
    for row in result["rows"]:
        r = row["full"]
        if r["reached"]:
            assert r["best_cost"] <= idm_floor.TOL  # lands on the recorded next observation
            assert r["spread"] <= idm_floor.SAME and r["sq_err"] < 1e-10  # ... with the recorded action
        assert np.isfinite(r["gain"]) and r["gain"] > 0
    # HalfCheetah observes qvel unclipped
    assert not any(row["clipped_s"] or row["clipped_next"] for row in result["rows"])
    assert result["summary"]["all"]["observed"] == full  # nothing hidden: observed state == full state


def test_oracle_cannot_reach_an_observation_from_another_state(cheetah):
    """The fit is a real test: the next observation of another transition is out of reach of any action."""
    t, replay, std, oracle = cheetah
    i, j = seeded_sample(np.flatnonzero(replay.successor), 2, seed=1, stream=0)
    target = replay.observe([j + 1])[0]
    sols = oracle.solutions(
        t.qpos[i], t.qvel[i], target, np.array([], int), (np.empty(0), np.empty(0)), [np.zeros(t.act_dim)]
    )
    assert sols[0][1] > 1e-2


def test_greedy_oracle_tracks_better_than_the_mean_action(cheetah):
    t, replay, std, oracle = cheetah
    starts = seeded_sample(window_starts(replay.successor, np.ones(len(t), bool), 8), 4, seed=0, stream=1)
    drift, at_h, _ = idm_floor.tracking(
        replay, oracle, starts, 8, std, t.act.mean(0), models={}, noise=[1e-3], seed=0, progress=False
    )
    assert set(drift) == {"oracle", "oracle+noise=0.001", "recorded", "mean_action"}
    assert all(len(curve) == 8 for curve in drift.values())
    assert set(at_h) == set(drift) and all(len(v) == replay.env_obs_dim for v in at_h.values())
    assert drift["recorded"][-1] < 1e-6 and drift["oracle"][-1] < 1e-4  # exact actions exist and are found
    # off the recorded track (noisy actions), the greedy solver still pulls back toward it
    assert drift["oracle+noise=0.001"][-1] < 0.5 * drift["mean_action"][-1]
    assert drift["oracle"][-1] < drift["mean_action"][-1]


def test_observed_state_oracle_recovers_the_action_behind_a_clipped_velocity(sim_files):
    """Hopper-v5 shows qvel clipped at +-10: with that velocity unknown, the action is still found from s'."""
    t = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    replay = Replay(t)
    try:
        std = GaussianNormalizer.from_data(t.obs).std[: replay.env_obs_dim]
        oracle = idm_floor.Oracle(replay, std)
        i, j = 100, 3  # a thigh joint spinning at 15 rad/s: the observation shows 10
        qvel = t.qvel[i].astype(np.float64).copy()
        qvel[j] = 15.0
        replay._set(t.qpos[i], qvel)
        shown = replay._obs()[replay.env_obs_dim - len(qvel) + j]
        assert shown == 10.0
        action = np.array([0.3, -0.5, 0.8])
        target = replay._step(action)
        free, bounds = np.array([j]), (np.array([10.0]), np.array([30.0]))
        starts = [np.array([0.0, 0.0, 0.0, 12.0]), np.array([-0.5, 0.5, 0.0, 25.0])]  # (action, velocity)
        sols = oracle.solutions(t.qpos[i], qvel, target, free, bounds, starts)
        best, cost = min(sols, key=lambda s: s[1])
        assert cost <= idm_floor.TOL
        np.testing.assert_allclose(best, action, atol=1e-6)
        # the velocity matters: pretending it is the shown 10 leaves no action that reaches s'
        at_edge = qvel.copy()
        at_edge[j] = 10.0
        none = (np.array([], int), (np.empty(0), np.empty(0)))
        sols = oracle.solutions(t.qpos[i], at_edge, target, *none, [np.zeros(3)])
        assert sols[0][1] > 100 * idm_floor.TOL
    finally:
        replay.close()
