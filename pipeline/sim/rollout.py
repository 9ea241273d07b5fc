"""Rolling out Gymnasium MuJoCo envs under a behaviour policy: the work each simulation process does.

Kept free of invdyn / torch imports: `python -m pipeline.sim.rollout` worker processes start in a fraction of a
second (a multiprocessing "spawn" child would re-import the parent's main module, and with it torch).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from pipeline.sim.policies import episode_actions

#: Gymnasium MuJoCo envs we simulate: short name -> env id, make() kwargs, obs / act dims.
#: Ant drops the contact-force part of the observation (27 dims = qpos[2:] + qvel): D4RL's 111-dim ant
#: observations are these 27 followed by 84 contact-force dims that D4RL's MuJoCo 2.x left at zero.
SIM_ENVS: dict[str, dict] = {
    "halfcheetah": {"env_id": "HalfCheetah-v5", "env_kwargs": {}, "obs_dim": 17, "act_dim": 6},
    "hopper": {"env_id": "Hopper-v5", "env_kwargs": {}, "obs_dim": 11, "act_dim": 3},
    "walker2d": {"env_id": "Walker2d-v5", "env_kwargs": {}, "obs_dim": 17, "act_dim": 6},
    "ant": {
        "env_id": "Ant-v5",
        "env_kwargs": {"include_cfrc_ext_in_observation": False},
        "obs_dim": 27,
        "act_dim": 8,
    },
}
#: D4RL's episode limit for the locomotion envs
MAX_EPISODE_STEPS = 1000


def make_env(env: str):
    """The bare MuJoCo env (no TimeLimit / checker wrappers: we count steps ourselves, and they cost time)."""
    import gymnasium
    import mujoco

    if mujoco.get_mju_user_warning() is None:  # else MuJoCo appends to MUJOCO_LOG.TXT in the working dir
        mujoco.set_mju_user_warning(_mujoco_warning)

    spec = SIM_ENVS[env]
    return gymnasium.make(spec["env_id"], disable_env_checker=True, **spec["env_kwargs"]).unwrapped


def _mujoco_warning(msg: str) -> None:
    # Gymnasium's hopper / walker XML trips a compiler deprecation notice on every load: not the user's business
    level = logging.DEBUG if "deprecated" in msg else logging.WARNING
    logging.getLogger("mujoco").log(level, "MuJoCo: %s", msg.strip())


def rollout_chunk(env_name: str, policy_name: str, seed: int, chunk: int, size: int) -> dict[str, np.ndarray]:
    """Roll out exactly `size` transitions; an episode cut by the chunk end is marked as a timeout."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    env = make_env(env_name)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    nq, nv = env.model.nq, env.model.nv
    out = {
        "observations": np.empty((size, obs_dim), np.float32),
        "actions": np.empty((size, act_dim), np.float32),
        "next_observations": np.empty((size, obs_dim), np.float32),
        "rewards": np.empty(size, np.float32),
        "terminals": np.zeros(size, bool),
        "timeouts": np.zeros(size, bool),
        "qpos": np.empty((size, nq), np.float64),
        "qvel": np.empty((size, nv), np.float64),
    }
    i, env_seed = 0, int(rng.integers(2**31 - 1))
    while i < size:
        obs, _ = env.reset(seed=env_seed if i == 0 else None)
        actions = episode_actions(
            policy_name, rng, MAX_EPISODE_STEPS, env.action_space.low, env.action_space.high, env.dt
        )
        for t, action in enumerate(actions):  # float32, stored and applied as is: replay is exact
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
    env.close()
    return out


def run_worker(job_dir: Path, worker: int, workers: int) -> None:
    """Worker process: roll out chunks worker, worker + workers, ... of job_dir/jobs.json.

    Each chunk is saved as job_dir/chunk-<c>.npz (written under a temp name, then renamed), so the parent
    sees only finished chunks.
    """
    jobs = json.loads((job_dir / "jobs.json").read_text())
    for job in jobs[worker::workers]:
        part = rollout_chunk(*job)
        tmp = job_dir / f".chunk-{job[3]}.tmp.npz"
        np.savez(tmp, **part)
        os.replace(tmp, job_dir / f"chunk-{job[3]}.npz")


if (
    __name__ == "__main__"
):  # python -m pipeline.sim.rollout JOB_DIR WORKER WORKERS (started by pipeline.sim.simulate)
    run_worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
