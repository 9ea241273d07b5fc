"""The D4RL-like sim sets come from the committed agents: their safetensors actors run with plain torch,
every kind is a valid D4RL-layout file fixed by (name, transitions, seed), medium-expert is the union of
medium and expert, medium-replay replays the recorded training rollouts, and `datasets info` reports the
facts that tell these sets from the open-loop ones."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.data.catalog import AGENT_KINDS, CATALOG, SUITES
from pipeline.data.cli import main as datasets_main
from pipeline.data.facts import dataset_facts
from pipeline.data.scores import normalized_score
from pipeline.data.sources import load_transitions
from pipeline.sim.agent_policy import AGENT_DIR, CHECKPOINTS, agent_path, load_actor
from pipeline.sim.agent_rollout import replay_chunk, replay_record
from pipeline.sim.rollout import make_env
from pipeline.sim.simulate import main as simulate_main
from pipeline.sim.simulate import simulate

ENVS = ("hopper", "walker2d", "halfcheetah")
KEYS = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts")


def read(path) -> dict:
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in KEYS}
        data["qpos"], data["qvel"] = f["infos/qpos"][()], f["infos/qvel"][()]
        data["attrs"] = dict(f.attrs)
    return data


def test_suite_names_every_kind_of_every_env():
    assert SUITES["sim-d4rl"] == [f"sim-{e}-{k}-v0" for e in sorted(ENVS) for k in AGENT_KINDS]
    assert all(CATALOG[n]["kind"] == "simulated" for n in SUITES["sim-d4rl"])


def test_actors_load_without_stable_baselines3():
    code = (
        "import sys; from pipeline.sim.agent_policy import agent_path, load_actor\n"
        "for env in ('hopper', 'walker2d', 'halfcheetah'):\n"
        "    for c in ('medium', 'expert'): load_actor(agent_path(env, c))\n"
        "assert 'stable_baselines3' not in sys.modules, 'SB3 was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("env", ENVS)
def test_committed_policies_act(env):
    card = json.loads((AGENT_DIR / env / "card.json").read_text())
    mujoco = make_env(env)
    obs, _ = mujoco.reset(seed=0)
    for checkpoint in CHECKPOINTS:
        actor, meta = load_actor(agent_path(env, checkpoint))
        assert meta["env"] == env and meta["obs_dim"] == obs.shape[0] and meta["steps"] <= card["steps"]
        batch = np.repeat(obs[None].astype(np.float32), 64, axis=0)
        mean = actor.act(batch)
        sampled = actor.act(batch, np.random.default_rng(0).standard_normal(mean.shape))
        assert mean.shape == (64, mujoco.action_space.shape[0]) and np.all(np.abs(sampled) <= 1)
        assert np.ptp(mean, axis=0).max() == 0 and np.ptp(sampled, axis=0).max() > 0  # noise, not state
        next_obs, *_ = mujoco.step(mean[0])
        assert np.abs(next_obs - obs).max() > 0
    expert_step = card["scores"]["expert"]["steps"]
    if card.get("expert_selection", "latest") == "latest":
        assert expert_step == card["steps"]
    else:  # the best evaluation after medium
        assert card["medium_step"] <= expert_step <= card["steps"]


@pytest.mark.parametrize("env", ENVS)
def test_every_kind_through_the_command_line(env, tmp_path):
    names = [f"sim-{env}-{kind}-v0" for kind in AGENT_KINDS]
    assert simulate_main([*names, "--transitions", "1200", "--seed", "3", "--out", str(tmp_path)]) == 0
    for name in names:
        data = read(tmp_path / f"{name}.hdf5")
        n, entry = len(data["rewards"]), CATALOG[name]
        assert n == 1200 and data["attrs"]["name"] == name and data["attrs"]["policy"] == entry["policy"]
        assert data["observations"].shape == data["next_observations"].shape == (n, entry["obs_dim"])
        assert data["actions"].shape == (n, entry["act_dim"]) and np.all(np.abs(data["actions"]) <= 1)
        assert data["qpos"].shape[0] == data["qvel"].shape[0] == n
        assert data["timeouts"][-1] or data["terminals"][-1]  # the last episode is closed
        inside = ~(data["terminals"] | data["timeouts"])[:-1]
        np.testing.assert_array_equal(
            data["next_observations"][:-1][inside], data["observations"][1:][inside]
        )


def test_a_dataset_depends_only_on_name_transitions_and_seed(tmp_path):
    a = read(
        simulate("sim-hopper-medium-v0", transitions=5200, seed=5, out_dir=tmp_path / "a", progress=False)
    )
    b = read(simulate("sim-hopper-medium-v0", transitions=5200, seed=5, out_dir=tmp_path / "b", workers=2))
    c = read(
        simulate("sim-hopper-medium-v0", transitions=5200, seed=6, out_dir=tmp_path / "c", progress=False)
    )
    for key in (*KEYS, "qpos"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # workers change nothing
    assert not np.array_equal(a["actions"], c["actions"])


def test_medium_expert_is_the_union(tmp_path):
    union = read(simulate("sim-walker2d-medium-expert-v0", transitions=2001, seed=2, out_dir=tmp_path))
    medium = read(simulate("sim-walker2d-medium-v0", transitions=1001, seed=2, out_dir=tmp_path))
    expert = read(simulate("sim-walker2d-expert-v0", transitions=1000, seed=2, out_dir=tmp_path))
    for key in (*KEYS, "qpos", "qvel"):
        np.testing.assert_array_equal(union[key], np.concatenate([medium[key], expert[key]]), err_msg=key)
    assert set(json.loads(union["attrs"]["agents"])) == {"medium", "expert"}


def test_medium_replay_replays_the_recorded_rollouts(tmp_path):
    rec = replay_record("halfcheetah")
    n = int(rec["lengths"][:2].sum())  # the first two recorded episodes, whole
    data = replay_chunk("halfcheetah", 0, 0, 0, n)
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    np.testing.assert_array_equal(ends, np.cumsum(rec["lengths"][:2]))
    returns = np.add.reduceat(data["rewards"].astype(np.float64), [0, ends[0]])
    np.testing.assert_allclose(returns, rec["returns"][:2], rtol=1e-5)  # the training's own returns
    np.testing.assert_array_equal(data["qpos"][[0, ends[0]]], rec["init_qpos"][:2])
    # more transitions than recorded: the file holds the record, no more
    total = int(rec["lengths"].sum())
    path = simulate("sim-halfcheetah-medium-replay-v0", transitions=total + 500, out_dir=tmp_path, workers=1)
    assert len(read(path)["rewards"]) == total


def test_medium_replay_takes_whole_episodes_over_the_whole_record(tmp_path):
    """D4RL's medium-replay is the whole buffer up to medium: a smaller set draws whole episodes from all of
    the record (not its first, random-warm-up rows), deterministic in (name, transitions, seed)."""
    from pipeline.sim.agent_rollout import replay_selection

    rec = replay_record("hopper")
    lengths = rec["lengths"].astype(np.int64)
    n = 4000
    episodes, steps = replay_selection("hopper", n, 0)
    assert steps.sum() == n and np.all(np.diff(episodes) > 0)  # in the record's order, each episode once
    assert (steps == lengths[episodes]).sum() >= len(steps) - 1  # whole episodes, at most one cut to fit
    assert episodes.max() > 0.5 * len(lengths) and episodes.min() < 0.5 * len(lengths)  # spread over it all
    first_rows = np.searchsorted(np.cumsum(lengths), n)  # what the first n rows of the record would hold
    assert len(set(episodes) - set(range(first_rows + 1))) > 0
    again, other = replay_selection("hopper", n, 0), replay_selection("hopper", n, 1)
    assert np.array_equal(again[0], episodes) and not np.array_equal(other[0], episodes)
    a = read(
        simulate("sim-hopper-medium-replay-v0", transitions=n, seed=0, out_dir=tmp_path / "a", workers=1)
    )
    b = read(
        simulate("sim-hopper-medium-replay-v0", transitions=n, seed=0, out_dir=tmp_path / "b", workers=2)
    )
    for key in (*KEYS, "qpos"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ends = np.flatnonzero(a["terminals"] | a["timeouts"]) + 1
    np.testing.assert_array_equal(ends, np.cumsum(steps))  # one episode per drawn one, none crosses
    whole = steps == lengths[episodes]
    returns = np.add.reduceat(a["rewards"].astype(np.float64), np.concatenate([[0], ends[:-1]]))
    np.testing.assert_allclose(returns[whole], rec["returns"][episodes[whole]], rtol=1e-5)
    assert a["attrs"]["replay_selection"]
    assert len(a["rewards"]) == n and a["timeouts"][-1] | a["terminals"][-1]


def test_a_medium_replay_file_of_the_old_layout_is_refused_with_the_command():
    from pipeline.data.catalog import DatasetError, d4rl_dir

    name = "sim-hopper-medium-replay-v0"
    path = simulate(name, transitions=1500, seed=0, out_dir=d4rl_dir(), workers=1, progress=False)
    assert len(load_transitions(name)) == 1500
    with h5py.File(path, "a") as f:
        del f.attrs["replay_selection"]  # as pipeline.simulate wrote it before
    with pytest.raises(DatasetError, match="random warm-up") as err:
        load_transitions(name)
    assert f"python -m pipeline.simulate {name} --out {path.parent} --transitions 1500" in str(err.value)


def test_info_json_reports_the_facts(tmp_path, capsys):
    path = simulate("sim-hopper-expert-v0", transitions=3000, seed=0, out_dir=tmp_path, progress=False)
    assert datasets_main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    data = read(path)
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    returns = np.add.reduceat(data["rewards"].astype(np.float64), np.concatenate([[0], ends[:-1]]))
    lengths = np.diff(np.concatenate([[0], ends]))
    # complete episodes only: a fall, or the step limit; not the last one, which the file's end cuts
    complete = data["terminals"][ends - 1] | (lengths == data["attrs"]["max_episode_steps"])
    assert 0 < complete.sum() < len(returns)
    assert info["return_mean"] == pytest.approx(returns[complete].mean())
    assert info["return_episodes"] == complete.sum()
    assert info["normalized_score"] == pytest.approx(normalized_score("hopper", returns[complete].mean()))
    vel = np.abs(np.concatenate([data["observations"][:, 5:], data["next_observations"][:, 5:]], axis=1))
    assert info["velocity_clip_fraction"] == pytest.approx((vel >= 10 - 1e-6).any(axis=1).mean())
    assert 0 <= info["action_bound_fraction"] <= 1
    assert datasets_main(["info", str(path)]) == 0
    assert "| D4RL-normalized score" in capsys.readouterr().out


def test_facts_of_an_open_loop_set(sim_files):
    path = sim_files["sim-hopper-random-v0"]
    facts = dataset_facts(load_transitions(str(path)), path)
    assert facts["return_episodes"] > 10 and facts["normalized_score"] < 10  # random is D4RL's 0
    # uniform random actions in [-1, 1]: about 2 * BOUND_TOL / 2 of the entries sit at a bound
    assert facts["action_bound_fraction"] < 0.01 and 0 <= facts["velocity_clip_fraction"] <= 1


def test_generating_in_process_leaves_torch_threads_alone(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        simulate("sim-hopper-expert-v0", transitions=300, out_dir=tmp_path, workers=1, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_set_generated_by_older_agents_is_refused(tmp_path, monkeypatch):
    """After the committed actors change, a sim-d4rl file made from the old ones is not used, even though its
    parse is in the Arrow cache: its name would no longer say what its data is."""
    import shutil

    from safetensors.torch import load_file

    import pipeline.sim.agent_policy as agent_policy
    from pipeline.data.catalog import DatasetError, d4rl_dir
    from pipeline.sim.agent_policy import read_meta, save_actor

    name = "sim-hopper-expert-v0"
    path = simulate(name, transitions=600, seed=0, out_dir=d4rl_dir(), workers=1, progress=False)
    assert len(load_transitions(name)) == 600  # current agents: used, and cached

    newer = tmp_path / "agent_weights"
    shutil.copytree(AGENT_DIR, newer)
    actor = newer / "hopper" / "expert.safetensors"
    save_actor(actor, load_file(str(actor)), read_meta(actor) | {"steps": read_meta(actor)["steps"] + 10_000})
    monkeypatch.setattr(agent_policy, "AGENT_DIR", newer)
    with pytest.raises(DatasetError, match=r"other agents than the committed ones") as err:
        load_transitions(name)
    assert str(path) in str(err.value) and f"pipeline.simulate {name}" in str(err.value)
    simulate("sim-hopper-random-v0", transitions=600, seed=0, out_dir=d4rl_dir(), workers=1, progress=False)
    assert len(load_transitions("sim-hopper-random-v0")) == 600  # open-loop sets have no agents to check
