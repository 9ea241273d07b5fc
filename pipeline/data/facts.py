"""Facts about a dataset's behaviour that say what kind of data it is: episode returns (raw and
D4RL-normalized), how often a joint velocity sits at the observation clip, how often actions sit at bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.catalog import SIM_ENVS
from pipeline.data.scores import env_of, normalized_score
from pipeline.data.transitions import Transitions

#: Gymnasium's Hopper / Walker2d clip the velocity part of the observation to +-10 (so did D4RL's v2 envs);
#: HalfCheetah and Ant do not clip, and the same threshold says how often their velocities reach it
VELOCITY_CLIP = 10.0
#: the velocity part of each env's observation: its last `nv` entries (qpos[1:] or qpos[2:], then qvel)
VELOCITY_DIMS = {"hopper": 6, "walker2d": 9, "halfcheetah": 9, "ant": 14}
#: an action within this of its bound counts as at the bound (squashed policies come within 1e-7 of it)
BOUND_TOL = 1e-3
FACT_KEYS = (
    "return_mean",
    "return_std",
    "return_episodes",
    "normalized_score",
    "velocity_clip_fraction",
    "action_bound_fraction",
)


def _env(name: str, env_id: str | None) -> str | None:
    for short, spec in SIM_ENVS.items():
        if env_id == spec["env_id"]:
            return short
    return env_of(name)


def episode_returns(path: Path) -> np.ndarray | None:
    """Return of every complete episode of a D4RL-layout HDF5 file: one that ends at a terminal, or at a
    timeout after the file's `max_episode_steps` (attribute of sim files; without it, any timeout).
    Episodes cut short (by the end of the file, or where the generator starts a new chunk) would lower the
    mean, so they are left out unless no episode is complete. None for files without rewards or other
    formats."""
    if Path(path).suffix.lower() not in (".hdf5", ".h5"):
        return None
    import h5py

    with h5py.File(path, "r") as f:
        if "rewards" not in f:
            return None
        rewards = np.asarray(f["rewards"], np.float64).reshape(-1)
        flags = {k: np.asarray(f[k], bool).reshape(-1) for k in ("terminals", "timeouts") if k in f}
        max_steps = f.attrs.get("max_episode_steps")
    if len(rewards) == 0:
        return None
    terminals = flags.get("terminals", np.zeros(len(rewards), bool))
    ends = terminals | flags.get("timeouts", np.zeros(len(rewards), bool))
    stops = np.flatnonzero(ends[:-1]) + 1
    begins, finals = np.concatenate([[0], stops]), np.concatenate([stops, [len(rewards)]]) - 1
    returns = np.add.reduceat(rewards, begins)
    lengths = finals - begins + 1
    complete = terminals[finals] | (ends[finals] & (max_steps is None or lengths >= int(max_steps)))
    return returns[complete] if complete.any() else returns


def velocity_clip_fraction(t: Transitions, env: str | None) -> float | None:
    """Fraction of transitions with a joint velocity at abs(v) >= VELOCITY_CLIP in s or s' (None: no env)."""
    dims = VELOCITY_DIMS.get(env)
    if dims is None or t.obs_dim < dims or len(t) == 0:
        return None
    at = VELOCITY_CLIP - 1e-6
    hit = (np.abs(t.obs[:, -dims:]) >= at).any(axis=1) | (np.abs(t.next_obs[:, -dims:]) >= at).any(axis=1)
    return float(hit.mean())


def action_bound_fraction(t: Transitions) -> float | None:
    """Fraction of action entries within BOUND_TOL of the box [-1, 1] every D4RL / sim env uses."""
    if len(t) == 0:
        return None
    return float((np.abs(t.act) >= 1.0 - BOUND_TOL).mean())


def dataset_facts(t: Transitions, path: Path | None = None) -> dict:
    """The FACT_KEYS of a dataset; None where a fact does not apply (no rewards, no reference scores)."""
    env = _env(t.name, t.stats.get("env_id"))
    returns = episode_returns(path) if path is not None and Path(path).is_file() else None
    mean = None if returns is None else float(returns.mean())
    return {
        "return_mean": mean,
        "return_std": None if returns is None else float(returns.std()),
        "return_episodes": None if returns is None else int(len(returns)),
        "normalized_score": None if mean is None else normalized_score(env, mean),
        "velocity_clip_fraction": velocity_clip_fraction(t, env),
        "action_bound_fraction": action_bound_fraction(t),
    }


def facts_table(facts: dict) -> list[str]:
    """The facts as lines of a two-column table, for people."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    ret = "n/a"
    if facts["return_mean"] is not None:
        ret = f"{facts['return_mean']:.1f} ± {facts['return_std']:.1f} ({facts['return_episodes']} episodes)"
    score = "n/a" if facts["normalized_score"] is None else f"{facts['normalized_score']:.1f}"
    rows = [
        ("episode return (mean ± std)", ret),
        ("D4RL-normalized score", score),
        (f"transitions with a velocity at +-{VELOCITY_CLIP:g}", pct(facts["velocity_clip_fraction"])),
        ("action entries at their bounds", pct(facts["action_bound_fraction"])),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"| {'fact':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"] + [
        f"| {k:<{width}} | {v} |" for k, v in rows
    ]
