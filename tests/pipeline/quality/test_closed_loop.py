"""Closed loop: the oracle planner's plans are the states the actor reaches (k steps ahead for a jumpy model),
the IDM never sees the actor's action, every policy meets the same episodes, and the rows of
`pipeline.evaluate --closed-loop` keep their contract (real MuJoCo, the committed agents)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import invdyn
from pipeline.data.sources import load_transitions
from pipeline.evaluate import main as evaluate_main
from pipeline.quality.closed_loop import ClosedLoopConfig, closed_loop_rows, interval, plan_return
from pipeline.sim.closed_loop import actor_policy, constant_policy, episode_seeds, run_episodes

ROW_KEYS = {
    "planner",
    "plan_noise",
    "episodes",
    "normalized_return",
    "normalized_return_ci95",
    "fall_rate",
    "actor_normalized_return",
    "baseline_normalized_return",
    "return_ratio",
}


def recording_actor(env: str, seen: list):
    """The actor acting on the true observation, recording (obs, plans) of every step."""
    act = actor_policy(env)

    def record(obs, plans):
        seen.append((obs.copy(), None if plans is None else plans.copy()))
        return act(obs, plans)

    return record


@pytest.mark.parametrize("k", [1, 3])
def test_plans_are_the_states_the_actor_reaches_k_steps_ahead(k):
    seen = []
    got = run_episodes("hopper", recording_actor("hopper", seen), episode_seeds(2), k=k, max_steps=60)
    assert got.steps == sum(len(o) for o, _ in seen)
    for t in range(len(seen) - k):
        obs_later, _ = seen[t + k]
        obs_now, plans = seen[t]
        if len(obs_later) == len(obs_now):  # no episode ended in between
            np.testing.assert_allclose(plans, obs_later, rtol=0, atol=1e-5)  # float32 plans of the states
    # and they are plans, not copies of the present: the next state differs from this one
    assert not np.allclose(seen[0][1], seen[0][0], atol=1e-3)


def test_the_same_seeds_give_the_same_episodes_and_noise_is_seeded():
    seeds = episode_seeds(3)
    act = actor_policy("hopper")
    a = run_episodes("hopper", act, seeds, max_steps=80, needs_plan=False)
    b = run_episodes("hopper", act, seeds, max_steps=80, needs_plan=False)
    assert np.array_equal(a.returns, b.returns) and not np.allclose(a.returns, a.returns[0])
    std = np.full(11, 0.5)
    noisy = [
        run_episodes("hopper", _plan_follower(), seeds, max_steps=40, plan_noise=0.1, obs_std=std)
        for _ in range(2)
    ]
    assert np.array_equal(noisy[0].returns, noisy[1].returns)
    other = run_episodes("hopper", _plan_follower(), episode_seeds(3, "val"), max_steps=40, plan_noise=0.1)
    assert not np.array_equal(other.returns, noisy[0].returns)  # validation seeds are other episodes


def _plan_follower():
    """A crude IDM: the action that points toward the plan's first velocities (it reads only obs, plan)."""

    def act(obs, plans):
        return np.tanh(plans[:, -3:] - obs[:, -3:])

    return act


def test_ceiling_is_the_actor_and_an_input_blind_model_scores_the_floor(sim_files):
    """The IDM sees only (s_t, ŝ_{t+1}): the actor's own policy gives ratio 1, a model whose output ignores
    its inputs gives exactly the mean-action floor's return, at every σ."""
    hopper = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    mean = hopper.act.astype(np.float64).mean(0)
    config = ClosedLoopConfig(plan_noise=(0.0, 0.1), episodes=3, max_steps=300)
    std = hopper.obs.std(0)
    actor = closed_loop_rows(actor_policy("hopper"), hopper, config, mean_action=mean, obs_std=std)
    assert [r["return_ratio"] for r in actor["closed_loop"]] == [1.0, 1.0]
    blind = closed_loop_rows(constant_policy(mean), hopper, config, mean_action=mean, obs_std=std)
    for row in blind["closed_loop"]:
        assert set(row) >= ROW_KEYS
        assert row["normalized_return"] == pytest.approx(row["baseline_normalized_return"], abs=1e-9)
        assert row["fall_rate"] == row["baseline_fall_rate"] == 1.0  # hopper falls under a constant action
        assert row["return_ratio"] < 0.2 < 0.9 < actor["closed_loop"][0]["return_ratio"]
    assert blind["plan_return"] == pytest.approx(
        np.mean([r["normalized_return"] for r in blind["closed_loop"]])
    )


def test_interval_is_a_seeded_bootstrap_of_the_mean():
    values = np.array([10.0, 12.0, 30.0, 11.0, 9.0, 13.0])
    low, high = interval(values)
    assert low < values.mean() < high and interval(values) == [low, high]
    assert interval(np.array([5.0])) == [5.0, 5.0] and interval(np.full(4, 2.0)) == [2.0, 2.0]
    assert plan_return(None) is None


def _blind_model_dir(tmp_path, transitions):
    """A real model directory whose output is the dataset's mean action, whatever its inputs."""
    obs_dim, act_dim = transitions.obs_dim, transitions.act_dim
    net = invdyn.FancyMlpInvDynamic(obs_dim, act_dim, hidden_dim=8)
    mean = transitions.act.astype(np.float64).mean(0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.mlp[-2].bias.copy_(torch.as_tensor(np.arctanh(mean / net.action_scale), dtype=torch.float32))
    normalizer = invdyn.GaussianNormalizer(transitions.obs.mean(0), transitions.obs.std(0))
    return invdyn.save_model_dir(tmp_path / "blind", net, normalizer, name="blind")


def test_evaluate_closed_loop_json_contract(sim_files, tmp_path, capsys):
    path = str(sim_files["sim-hopper-random-v0"])
    model = _blind_model_dir(tmp_path, load_transitions(path))
    args = [str(model), path, "--closed-loop", "--plan-noise", "0,0.05", "--episodes", "2", "--json"]
    assert evaluate_main([*args, "--no-physics"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["closed_loop"]
    assert [(r["planner"], r["plan_noise"], r["episodes"]) for r in rows] == [
        ("expert", 0.0, 2),
        ("expert", 0.05, 2),
    ]
    for row in rows:
        assert set(row) >= ROW_KEYS and len(row["normalized_return_ci95"]) == 2
        assert row["normalized_return"] == pytest.approx(row["baseline_normalized_return"], abs=1e-3)
    # the medium planner, and the human-readable table
    assert (
        evaluate_main(
            [str(model), path, "--closed-loop", "--planner", "medium", "--episodes", "1", "--no-physics"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "closed loop" in text and "| medium | 0 |" in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--plan-noise", "-0.1"], "--plan-noise takes σ values >= 0"),
        (["--planner", "novice"], "--planner must be among medium, expert"),
        (["--episodes", "0"], "--episodes must be >= 1"),
    ],
)
def test_bad_closed_loop_flags_are_refused_before_any_work(sim_files, tmp_path, capsys, flags, message):
    path = str(sim_files["sim-hopper-random-v0"])
    model = _blind_model_dir(tmp_path, load_transitions(path))
    assert evaluate_main([str(model), path, "--closed-loop", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_dataset_without_an_env_gets_null_with_a_reason(tmp_path):
    from helpers.training import linear_transitions

    data = linear_transitions()
    got = closed_loop_rows(
        constant_policy(np.zeros(2)), data, ClosedLoopConfig(), mean_action=np.zeros(2), obs_std=np.ones(5)
    )
    assert got["closed_loop"] is None and "no known locomotion env" in got["closed_loop_reason"]


def test_a_d4rl_name_runs_in_gymnasium_and_says_its_physics_differs(sim_files):
    import dataclasses

    hopper = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    d4rl = dataclasses.replace(hopper, name="hopper-medium-v2")
    mean = hopper.act.astype(np.float64).mean(0)
    config = ClosedLoopConfig(plan_noise=(0.0,), episodes=1, max_steps=50)
    got = closed_loop_rows(constant_policy(mean), d4rl, config, mean_action=mean, obs_std=np.ones(11))
    (row,) = got["closed_loop"]
    assert row["env"] == "hopper" and "mujoco-py" in row["physics_note"] and "v2" in row["physics_note"]
    sim = closed_loop_rows(constant_policy(mean), hopper, config, mean_action=mean, obs_std=np.ones(11))
    assert sim["closed_loop"][0]["physics_note"] is None
    ant = dataclasses.replace(hopper, name="sim-ant-random-v0", obs=np.zeros((3, 27), np.float32))
    ant = dataclasses.replace(
        ant, next_obs=ant.obs, act=np.zeros((3, 8), np.float32), episode=np.zeros(3, np.int64)
    )
    none = closed_loop_rows(
        constant_policy(np.zeros(8)), ant, config, mean_action=np.zeros(8), obs_std=np.ones(27)
    )
    assert none["closed_loop"] is None and "no committed ant agent" in none["closed_loop_reason"]
