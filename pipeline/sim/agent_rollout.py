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


#: how medium-replay picks its episodes (a file attribute): files made another way are refused, with the
#: command that makes them again (pipeline.sim.simulate.check_agents_current)
REPLAY_SELECTION = "whole episodes drawn over the entire record, seeded"


def replay_selection(env_name: str, total: int | None, seed: int, root: str | None = None):
    """(episode indices, steps taken of each) of a medium-replay set of `total` transitions: D4RL's
    medium-replay is the whole replay buffer up to medium, so the set is the entire record when `total`
    allows, else whole episodes drawn at random over all of it (seeded by `seed`) until `total` is
    reached, the last drawn one cut to fit; in the record's order."""
    lengths = replay_record(env_name, root)["lengths"].astype(np.int64)
    if total is None or total >= lengths.sum():
        return np.arange(len(lengths)), lengths
    taken, steps, n = [], [], 0
    for e in np.random.default_rng([int(seed), 0x5E1EC7]).permutation(len(lengths)):
        take = int(min(lengths[e], total - n))
        taken.append(int(e))
        steps.append(take)
        n += take
        if n == total:
            break
    order = np.argsort(taken)
    return np.asarray(taken)[order], np.asarray(steps, np.int64)[order]


def replay_chunk(
    env_name: str,
    seed: int,
    chunk: int,
    start: int,
    size: int,
    root: str | None = None,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Transitions start .. start + size of the medium-replay set of `total` transitions (`replay_selection`;
    None: the whole record in order), replayed in MuJoCo from each episode's recorded start state (`chunk`
    is unused: the record fixes everything). An episode cut short ends as a timeout."""
    rec = replay_record(env_name, root)
    episodes, lengths = replay_selection(env_name, total, seed, root)
    recorded = rec["lengths"].astype(np.int64)
    rec_begins = np.cumsum(recorded) - recorded
    ends = np.cumsum(lengths)
    begins = ends - lengths
    env = make_env(env_name)
    out = empty_record(env, size)
    k, i = int(np.searchsorted(ends, start, side="right")), 0
    while i < size:
        e = int(episodes[k])
        env.reset(seed=0)
        env.set_state(rec["init_qpos"][e], rec["init_qvel"][e])
        obs = env.unwrapped._get_obs()
        first = rec_begins[e]
        codes = rec["action_codes"][first : first + lengths[k]]
        actions = codes.astype(np.float32) / np.float32(ACTION_SCALE)
        whole = lengths[k] == recorded[e]
        for t, action in enumerate(actions):
            qpos, qvel = env.data.qpos.copy(), env.data.qvel.copy()
            next_obs, reward, terminated, _, _ = env.step(action)
            if begins[k] + t >= start + i:
                last = t == len(actions) - 1
                out["qpos"][i], out["qvel"][i] = qpos, qvel
                out["observations"][i], out["actions"][i], out["next_observations"][i] = obs, action, next_obs
                out["rewards"][i] = reward
                out["terminals"][i] = terminated and last and whole and rec["terminal"][e]
                out["timeouts"][i] = last and not out["terminals"][i]
                i += 1
                if i == size:
                    out["timeouts"][i - 1] |= not out["terminals"][i - 1]
                    break
            obs = next_obs
        k += 1
    env.close()
    return out
