"""Simulated D4RL-layout datasets from real MuJoCo physics (Gymnasium v5 envs), for running offline.

`python -m pipeline.simulate sim-halfcheetah-mixed-v0 [--transitions N] [--seed S] [--out DIR]` writes
DIR/NAME.hdf5 (default DIR: $D4RL_DATASET_DIR) with D4RL's keys plus `infos/qpos`, `infos/qvel`, the
simulator state at each observation, so every transition can be replayed.

Reproducible and parallel: the transitions are cut into fixed chunks, chunk c is rolled out from its own
seed (SeedSequence([seed, c])) in its own fresh env, and chunks are merged in order, so the file depends on
(name, transitions, seed) only, never on the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .catalog import CATALOG, DEFAULT_SIM_TRANSITIONS, SIM_ENVS, SIM_POLICIES, DatasetError, d4rl_dir, unknown

#: D4RL's episode limit for the locomotion envs
MAX_EPISODE_STEPS = 1000
#: transitions per independently seeded chunk (the unit of parallel work)
CHUNK = 5000
GENERATOR = "simulated by invdyn"
KEYS = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "qpos", "qvel")


def parse_sim_name(name: str) -> tuple[str, str]:
    """`sim-<env>-<policy>-v0` -> (env, policy)."""
    entry = CATALOG.get(name)
    if entry is None or not entry["simulated"]:
        if name.startswith("sim-"):
            raise DatasetError(
                f"cannot simulate {name!r}: simulated names are sim-<env>-<policy>-v0 with env in "
                f"{', '.join(SIM_ENVS)} and policy in {', '.join(SIM_POLICIES)}"
            )
        raise unknown(name)
    return entry["sim_env"], entry["policy"]


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
    from .policies import episode_actions

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


def _rollout_job(job):
    return rollout_chunk(*job)


def simulate(
    name: str,
    *,
    transitions: int | None = None,
    seed: int = 0,
    out_dir=None,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Generate `name` (a sim-* catalog name) and write it atomically to OUT_DIR/NAME.hdf5; returns the path."""
    env_name, policy_name = parse_sim_name(name)
    total = DEFAULT_SIM_TRANSITIONS if transitions is None else int(transitions)
    if total <= 0:
        raise DatasetError(f"--transitions must be positive, got {total}")
    sizes = [min(CHUNK, total - start) for start in range(0, total, CHUNK)]
    jobs = [(env_name, policy_name, int(seed), c, size) for c, size in enumerate(sizes)]
    parts = _run(jobs, workers, progress, desc=name)
    data = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
    out = Path(out_dir).expanduser() if out_dir is not None else d4rl_dir()
    path = out / f"{name}.hdf5"
    attrs = {
        "name": name,
        "env_id": SIM_ENVS[env_name]["env_id"],
        "env_kwargs": json.dumps(SIM_ENVS[env_name]["env_kwargs"], sort_keys=True),
        "policy": policy_name,
        "seed": int(seed),
        "transitions": total,
        "max_episode_steps": MAX_EPISODE_STEPS,
        "generator": GENERATOR,
    }
    write_hdf5(path, data, attrs)
    return path


def _run(jobs, workers: int, progress: bool, desc: str) -> list[dict]:
    from tqdm.auto import tqdm

    total = sum(j[-1] for j in jobs)
    bar = tqdm(total=total, desc=f"simulate {desc}", unit="step", unit_scale=True, disable=not progress)
    parts = []
    with bar:
        if workers <= 1 or len(jobs) == 1:
            results = map(_rollout_job, jobs)
            pool = None
        else:  # spawn: safe from any parent (Ray workers, torch threads); each worker builds its own env
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"))
            results = pool.map(_rollout_job, jobs)  # yields in job order: a deterministic merge
        try:
            for part in results:
                parts.append(part)
                bar.update(len(part["actions"]))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return parts


def write_hdf5(path: Path, data: dict[str, np.ndarray], attrs: dict) -> None:
    """D4RL layout (qpos / qvel under infos/), written to a temp file and renamed: never half-written."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in data.items():
                f.create_dataset(f"infos/{key}" if key in ("qpos", "qvel") else key, data=value)
            f.attrs.update(attrs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.simulate",
        description="Write a simulated D4RL-layout dataset (real MuJoCo rollouts) to DIR/NAME.hdf5.",
    )
    ap.add_argument("names", nargs="+", metavar="NAME", help="sim-<env>-<policy>-v0, e.g. sim-hopper-gait-v0")
    ap.add_argument("--transitions", type=int, default=None, help=f"default {DEFAULT_SIM_TRANSITIONS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: $D4RL_DATASET_DIR)")
    ap.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = ap.parse_args(argv)
    try:
        for name in args.names:
            path = simulate(
                name, transitions=args.transitions, seed=args.seed, out_dir=args.out, workers=args.workers
            )
            print(path)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
