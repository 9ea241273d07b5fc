"""The closed-loop runner: N episodes in lockstep, each step planned by an oracle planner
(`pipeline.sim.oracle_planner`) and acted by a policy that sees only (s_t, ŝ_{t+k}), so a network is called
once per step for all live episodes. The same reset seeds give the same episodes to every policy.

What it returns is raw: per-episode returns, lengths and whether the episode fell (terminated before the
step cap). Intervals, normalization and ratios are `pipeline.quality.closed_loop`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.sim.agent_rollout import _actor
from pipeline.sim.oracle_planner import OraclePlanner
from pipeline.sim.rollout import MAX_EPISODE_STEPS, make_env

#: first reset seed of each seed set: choices (`--select-by plan_return`) read "val", reports "test"
SEED_BASE = {"test": 1_000_000, "val": 2_000_000}


@dataclass
class Episodes:
    """What N closed-loop episodes gave, one entry per episode (in seed order)."""

    seeds: list[int]
    returns: np.ndarray  # raw returns (sum of the env's rewards)
    lengths: np.ndarray  # steps taken
    fell: np.ndarray  # terminated (unhealthy) before the step cap
    steps: int  # env steps in all (what a speed figure divides by)
    max_steps: int = MAX_EPISODE_STEPS  # the cap the episodes ran under


def episode_seeds(n: int, part: str = "test") -> list[int]:
    """The reset seeds of `n` episodes of `part` ("test" or "val"): the same for every model and σ."""
    if part not in SEED_BASE:
        raise ValueError(f"seed part must be one of {sorted(SEED_BASE)}, got {part!r}")
    return [SEED_BASE[part] + i for i in range(n)]


def plan_noise_draws(seed: int, steps: int, obs_dim: int) -> np.ndarray:
    """ε of one episode (steps, obs_dim), standard normal from its reset seed: every σ and every model
    meets the same draws, scaled (common random numbers make their differences less noisy)."""
    return np.random.default_rng([seed, 17]).standard_normal((steps, obs_dim))


def run_episodes(
    env_name: str,
    act: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    seeds: list[int],
    *,
    planner: str = "expert",
    k: int = 1,
    plan_noise: float = 0.0,
    obs_std: np.ndarray | None = None,
    needs_plan: bool = True,
    max_steps: int = MAX_EPISODE_STEPS,
    bar=None,
    on_step: Callable[[int, np.ndarray], None] | None = None,
) -> Episodes:
    """Run one episode per seed of `env_name` in lockstep.

    `act(obs, plans)` maps the live episodes' observations (n, obs_dim) and their plans (n, obs_dim,
    float32; None when `needs_plan` is off: the actor itself, a constant action) to actions (n, act_dim),
    clipped to the action box. Plans are `planner`'s, k steps ahead, plus `plan_noise` · `obs_std` · ε.
    `bar`: an optional tqdm bar counting env steps; `on_step(t, live)`, called before `act`, names the
    episodes (indices into `seeds`) whose rows `act` gets (a bench records per-episode statistics with it).
    """
    oracle = OraclePlanner(env_name, planner, k)
    envs = [make_env(env_name) for _ in seeds]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    try:
        obs = np.stack([e.reset(seed=int(s))[0] for e, s in zip(envs, seeds, strict=True)])
        std = np.ones(obs.shape[1]) if obs_std is None else np.asarray(obs_std, np.float64)
        noise = [plan_noise_draws(int(s), max_steps, obs.shape[1]) for s in seeds] if plan_noise else None
        returns, lengths = np.zeros(len(seeds)), np.zeros(len(seeds), np.int64)
        fell, live = np.zeros(len(seeds), bool), np.arange(len(seeds))
        for t in range(max_steps):
            if not len(live):
                break
            plans = None
            if needs_plan:
                plans = oracle.plan([envs[i] for i in live], obs[live])
                if noise is not None:
                    plans = plans + plan_noise * std * np.stack([noise[i][t] for i in live])
                plans = plans.astype(np.float32)
            if on_step is not None:
                on_step(t, live)
            actions = np.clip(np.asarray(act(obs[live].astype(np.float32), plans), np.float64), low, high)
            still = []
            for j, i in enumerate(live):
                obs[i], reward, terminated, _, _ = envs[i].step(actions[j])
                returns[i] += reward
                lengths[i] += 1
                if terminated:
                    fell[i] = True  # unhealthy: a fall, even at the last step
                else:
                    still.append(i)
            if bar is not None:
                bar.update(len(live))
            live = np.asarray(still, np.int64)
        return Episodes(list(map(int, seeds)), returns, lengths, fell, int(lengths.sum()), max_steps)
    finally:
        oracle.close()
        for e in envs:
            e.close()


def actor_policy(env_name: str, planner: str = "expert"):
    """The ceiling: the planner's actor acting itself (its mean action on the true observation)."""
    import torch

    actor = _actor(env_name, planner)

    def act(obs, plans):
        with torch.no_grad():
            return actor.act(obs)

    return act


def constant_policy(action: np.ndarray):
    """The floor: one action at every step (the training part's mean action)."""
    action = np.asarray(action, np.float64)
    return lambda obs, plans: np.broadcast_to(action, (len(obs), len(action)))
