"""Rolling out a Gymnasium MuJoCo env under a behaviour policy: the work of one chunk of a simulated dataset,
done in a simulation worker process."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.data.catalog import SIM_ENVS
from pipeline.sim.policies import episode_actions

#: D4RL's episode limit for the locomotion envs
MAX_EPISODE_STEPS = 1000


def make_env(env: str):
    """The bare MuJoCo env (no TimeLimit / checker wrappers: we count steps ourselves, and they cost time)."""
    import gymnasium

    log_mujoco_warnings()
    spec = SIM_ENVS[env]
    return gymnasium.make(spec["env_id"], disable_env_checker=True, **spec["env_kwargs"]).unwrapped


def log_mujoco_warnings() -> None:
    """Send MuJoCo's warnings to the `mujoco` logger; else MuJoCo appends them to MUJOCO_LOG.TXT in the
    working directory."""
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def _mujoco_warning(msg: str) -> None:
    # Gymnasium's hopper / walker XML trips a compiler deprecation notice on every load: not the user's
    # business
    level = logging.DEBUG if "deprecated" in msg else logging.WARNING
    logging.getLogger("mujoco").log(level, "MuJoCo: %s", msg.strip())


def empty_record(env, size: int) -> dict[str, np.ndarray]:
    """Arrays for `size` transitions of `env` in D4RL's layout (with the simulator state)."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    return {
        "observations": np.empty((size, obs_dim), np.float32),
        "actions": np.empty((size, act_dim), np.float32),
        "next_observations": np.empty((size, obs_dim), np.float32),
        "rewards": np.empty(size, np.float32),
        "terminals": np.zeros(size, bool),
        "timeouts": np.zeros(size, bool),
        "qpos": np.empty((size, env.model.nq), np.float64),
        "qvel": np.empty((size, env.model.nv), np.float64),
    }


def record_episode(env, obs, act, out: dict, i: int, size: int) -> int:
    """Step `env` from `obs` with `act(t, obs)` until the episode ends, MAX_EPISODE_STEPS or row `size`,
    writing rows from `i` of `out`; returns the next free row. An episode cut short is marked a timeout."""
    for t in range(MAX_EPISODE_STEPS):
        action = act(t, obs)  # float32, stored and applied as is: replay is exact
        out["qpos"][i], out["qvel"][i] = env.data.qpos, env.data.qvel
        next_obs, reward, terminated, _, _ = env.step(action)
        out["observations"][i], out["actions"][i], out["next_observations"][i] = obs, action, next_obs
        out["rewards"][i], out["terminals"][i] = reward, terminated
        i += 1
        if terminated:
            break
        if t == MAX_EPISODE_STEPS - 1 or i == size:
            out["timeouts"][i - 1] = True
            break
        obs = next_obs
    return i


def rollout_chunk(env_name: str, policy_name: str, seed: int, chunk: int, size: int) -> dict[str, np.ndarray]:
    """Roll out exactly `size` transitions; an episode cut by the chunk end is marked as a timeout."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    env = make_env(env_name)
    out = empty_record(env, size)
    i, env_seed = 0, int(rng.integers(2**31 - 1))
    while i < size:
        obs, _ = env.reset(seed=env_seed if i == 0 else None)
        actions = episode_actions(
            policy_name, rng, MAX_EPISODE_STEPS, env.action_space.low, env.action_space.high, env.dt
        )
        i = record_episode(env, obs, lambda t, _obs, actions=actions: actions[t], out, i, size)
    env.close()
    return out
