"""A Minari dataset written by Minari itself (from a real MuJoCo rollout) is read through `minari:<id>`."""

import sys
import warnings

import gymnasium
import numpy as np
import pytest

from pipeline.data.catalog import DatasetError, DatasetMissingError
from pipeline.data.sources import load_transitions, prepare


@pytest.fixture
def minari_dataset(tmp_path, monkeypatch):
    """Record 3 short Hopper-v5 episodes and let Minari write them as `test/hopper-random-v0` (HDF5)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = gymnasium.make("Hopper-v5", max_episode_steps=30)
    env.action_space.seed(0)
    episodes = []
    for ep in range(3):
        obs, _ = env.reset(seed=ep)
        o, a, r, term, trunc = [obs], [], [], [], []
        while not (term and term[-1] or trunc and trunc[-1]):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            (
                o.append(obs),
                a.append(action),
                r.append(reward),
                term.append(terminated),
                trunc.append(truncated),
            )
        episodes.append(
            EpisodeBuffer(
                id=ep,
                observations=np.array(o),
                actions=np.array(a),
                rewards=r,
                terminations=term,
                truncations=trunc,
                infos={},
            )
        )
    with warnings.catch_warnings():  # minari warns that no separate eval_env was given: not our business
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            "test/hopper-random-v0",
            episodes,
            env=env,
            algorithm_name="random",
            author="invdyn tests",
            author_email="tests@example.com",
            code_permalink="https://example.com",
            description="test data",
            data_format="hdf5",
        )
    return episodes


def test_minari_dataset_is_read(minari_dataset, tmp_path):
    t = load_transitions("minari:test/hopper-random-v0")
    eps = minari_dataset
    assert len(t) == sum(len(e.actions) for e in eps) and t.stats["episodes"] == 3
    assert t.stats["env_id"] == "Hopper-v5" and t.stats["format"] == "minari"
    assert t.stats["source"].endswith("data/main_data.hdf5")
    # episode k's pairs are (o_t, a_t, o_{t+1}) of that episode, never across episodes
    for k, e in enumerate(eps):
        rows = t.episode == k
        np.testing.assert_allclose(t.obs[rows], e.observations[:-1].astype(np.float32))
        np.testing.assert_allclose(t.next_obs[rows], e.observations[1:].astype(np.float32))
        np.testing.assert_allclose(t.act[rows], e.actions.astype(np.float32))
    with pytest.raises(DatasetError, match="looks like a Minari file: pass minari:<dataset-id>"):
        load_transitions(t.stats["source"])  # the Minari file by path is not D4RL layout
    info = prepare("minari:test/hopper-random-v0")
    assert (info["transitions"], info["obs_dim"], info["act_dim"]) == (len(t), 11, 3) and len(
        info["sha256"]
    ) == 64


def test_missing_minari_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    with pytest.raises(DatasetMissingError, match="minari download mujoco/hopper/expert-v0"):
        load_transitions("minari:mujoco/hopper/expert-v0")


def test_minari_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "minari.storage", None)  # an uninstalled package imports as None here
    with pytest.raises(DatasetError, match="pip install minari"):
        load_transitions("minari:mujoco/hopper/expert-v0")
