"""Rollouts of the committed agents (sim-<env>-medium / -expert: the stochastic policy, as D4RL sampled)
and the exact replay of the recorded training rollouts up to medium (sim-<env>-medium-replay)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from pipeline.data.catalog import DatasetError
from pipeline.sim.agent_policy import AGENT_DIR, agent_path, load_actor
from pipeline.sim.rollout import MAX_EPISODE_STEPS, empty_record, make_env, record_episode

#: the committed record of the training rollouts up to the medium checkpoint (see pipeline.agents.publish)
REPLAY_FILE = "medium_replay.npz"
#: int16 action codes of the replay record -> actions: code / ACTION_SCALE (as pipeline.agents.record)
ACTION_SCALE = 32767


@functools.lru_cache(maxsize=8)
def _actor(env_name: str, checkpoint: str, root: str | None = None):
    return load_actor(agent_path(env_name, checkpoint, Path(root) if root else None))[0]


def agent_chunk(
    env_name: str, checkpoint: str, seed: int, chunk: int, size: int, root: str | None = None
) -> dict[str, np.ndarray]:
    """`size` transitions of the stochastic `checkpoint` policy (medium / expert) of `env_name`'s agent
    (from AGENT_DIR, or `root`); the policy noise comes from SeedSequence([seed, chunk]): reproducible."""
    import torch

    threads = torch.get_num_threads()
    # one thread: the 256x256 actor on one observation gains nothing from more, and simulation workers
    # share the cores; restored after, since the caller's process may go on to train
    torch.set_num_threads(1)
    try:
        return _agent_steps(_actor(env_name, checkpoint, root), env_name, seed, chunk, size)
    finally:
        torch.set_num_threads(threads)


def _agent_steps(actor, env_name: str, seed: int, chunk: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    env = make_env(env_name)
    act_dim = env.action_space.shape[0]
    out = empty_record(env, size)
    i, env_seed = 0, int(rng.integers(2**31 - 1))
    while i < size:
        obs, _ = env.reset(seed=env_seed if i == 0 else None)
        noise = rng.standard_normal((MAX_EPISODE_STEPS, act_dim))

        def act(t, obs, noise=noise):
            return actor.act(obs[None], noise[t : t + 1])[0].astype(np.float32)

        i = record_episode(env, obs, act, out, i, size)
    env.close()
    return out


@functools.lru_cache(maxsize=4)
def replay_record(env_name: str, root: str | None = None) -> dict[str, np.ndarray]:
    """The committed replay record of `env_name`'s agent (in AGENT_DIR, or `root`): per episode its start
    state, length and return, and the int16 action codes of every step (MuJoCo is deterministic: the
    states follow from these)."""
    path = Path(root or AGENT_DIR) / env_name / REPLAY_FILE
    if not path.is_file():
        raise DatasetError(
            f"{path} does not exist: the {env_name} agent has no medium checkpoint yet; train it with "
            f"`python -m pipeline.agents train {env_name}` and publish it"
        )
    with np.load(path, allow_pickle=False) as f:
        return dict(f)


def replay_size(env_name: str, root: str | None = None) -> int:
    """Transitions in `env_name`'s medium-replay record."""
    return int(replay_record(env_name, root)["lengths"].sum())


def replay_chunk(
    env_name: str, seed: int, chunk: int, start: int, size: int, root: str | None = None
) -> dict[str, np.ndarray]:
    """Transitions start .. start + size of the recorded training rollouts, replayed in MuJoCo from each
    episode's recorded start state (`seed` and `chunk` are unused: the record fixes everything)."""
    rec = replay_record(env_name, root)
    lengths = rec["lengths"].astype(np.int64)
    ends = np.cumsum(lengths)
    begins = ends - lengths
    env = make_env(env_name)
    out = empty_record(env, size)
    episode, i = int(np.searchsorted(ends, start, side="right")), 0
    while i < size:
        env.reset(seed=0)
        env.set_state(rec["init_qpos"][episode], rec["init_qvel"][episode])
        obs = env.unwrapped._get_obs()
        first = begins[episode]
        actions = rec["action_codes"][first : ends[episode]].astype(np.float32) / np.float32(ACTION_SCALE)
        for t, action in enumerate(actions):
            qpos, qvel = env.data.qpos.copy(), env.data.qvel.copy()
            next_obs, reward, terminated, _, _ = env.step(action)
            if first + t >= start + i:
                out["qpos"][i], out["qvel"][i] = qpos, qvel
                out["observations"][i], out["actions"][i], out["next_observations"][i] = obs, action, next_obs
                out["rewards"][i] = reward
                out["terminals"][i] = terminated and t == len(actions) - 1 and rec["terminal"][episode]
                out["timeouts"][i] = t == len(actions) - 1 and not out["terminals"][i]
                i += 1
                if i == size:
                    out["timeouts"][i - 1] |= not out["terminals"][i - 1]
                    break
            obs = next_obs
        episode += 1
    env.close()
    return out
