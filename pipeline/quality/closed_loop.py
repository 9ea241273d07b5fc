"""Closed-loop return: execute an oracle planner's plans through an IDM and report the return it delivers,
beside the actor's own (the ceiling) and the training part's mean action (the floor), on the same episodes.

One row per (planner, σ): the return raw and D4RL-normalized with a 95 % bootstrap interval over episodes,
the fall rate, and `return_ratio` = the IDM's mean raw return / the actor's. A dataset without an env or
an agent gets `closed_loop: null` and `closed_loop_reason`, as the physics metrics do.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.scores import env_of, normalized_score

#: what a D4RL locomotion name's row says: its data came from other physics than these episodes
D4RL_PHYSICS_NOTE = "run in Gymnasium v5; D4RL's data came from mujoco-py (v2 envs): physics differs"


@dataclass
class ClosedLoopConfig:
    """Which closed loops an evaluation runs (one place for the defaults of the CLI and the job)."""

    plan_noise: tuple[float, ...] = field(default=(0.0, 0.05))  # σ of ŝ + σ·std·ε, in dataset stds
    episodes: int = 10  # episodes per (planner, σ), the same reset seeds for every model and σ
    planners: tuple[str, ...] = ("expert",)  # oracle planners (pipeline.sim.oracle_planner.PLANNERS)
    seeds: str = "test"  # seed set: "val" for choices (--select-by plan_return), "test" for reports
    max_steps: int = 1000  # the episode cap (D4RL's); a fall before it counts in `fall_rate`

    def validate(self) -> None:
        from pipeline.sim.oracle_planner import PLANNERS

        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {self.episodes}")
        bad = [s for s in self.plan_noise if not (np.isfinite(s) and s >= 0)]
        if bad or not self.plan_noise:
            raise ValueError(
                f"--plan-noise takes σ values >= 0, e.g. 0,0.05,0.1; got {list(self.plan_noise)}"
            )
        unknown = [p for p in self.planners if p not in PLANNERS]
        if unknown or not self.planners:
            raise ValueError(f"--planner must be among {', '.join(PLANNERS)}; got {list(self.planners)}")

    def to_json(self) -> dict:
        return {
            "plan_noise": list(self.plan_noise),
            "episodes": self.episodes,
            "planners": list(self.planners),
            "seeds": self.seeds,
            "max_steps": self.max_steps,
        }


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected numbers like 0,0.05,0.1; got {text!r}") from None


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def closed_loop_env(transitions) -> tuple[str | None, str | None]:
    """(the sim env short name, None) when `transitions` can be run in closed loop, else (None, why)."""
    from pipeline.data.catalog import SIM_ENVS
    from pipeline.sim.agent_policy import agent_path

    env = env_of(transitions.name) or env_of((transitions.stats or {}).get("env_name"))
    if env is None:
        env_id = (transitions.stats or {}).get("env_id")
        env = next((k for k, v in SIM_ENVS.items() if v["env_id"] == env_id), None)
    if env is None or env not in SIM_ENVS:
        return None, f"dataset {transitions.name!r} has no known locomotion env for a closed loop"
    dims = (SIM_ENVS[env]["obs_dim"], SIM_ENVS[env]["act_dim"])
    if (transitions.obs_dim, transitions.act_dim) != dims:
        return None, f"dataset {transitions.name!r} has obs/act dims {transitions.obs_dim}/" + (
            f"{transitions.act_dim}, the {env} env {dims[0]}/{dims[1]}"
        )
    if not agent_path(env, "expert").is_file():
        return None, f"no committed {env} agent to plan with (pipeline/sim/agent_weights/{env}/)"
    return env, None


def interval(values: np.ndarray) -> list[float]:
    """95 % percentile-bootstrap interval of the mean over episodes (seeded: the same data gives the same
    interval); a single episode gives [its value, its value]."""
    values = np.asarray(values, np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return [float(values.mean()), float(values.mean())]
    from scipy.stats import bootstrap

    ci = bootstrap(
        (values,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile", random_state=0
    ).confidence_interval
    return [float(ci.low), float(ci.high)]


def summarize(env: str, episodes) -> dict:
    """Return (raw and normalized, mean and interval), fall rate and steps of a set of episodes."""
    norm = [normalized_score(env, r) for r in episodes.returns]
    has_norm = all(v is not None for v in norm)
    out = {
        "return": float(episodes.returns.mean()),
        "return_ci95": interval(episodes.returns),
        "normalized_return": float(np.mean(norm)) if has_norm else None,
        "normalized_return_ci95": interval(np.asarray(norm)) if has_norm else None,
        "fall_rate": float(episodes.fell.mean()),
        "falls": int(episodes.fell.sum()),
        "mean_length": float(episodes.lengths.mean()),
    }
    return out


@functools.lru_cache(maxsize=32)
def _reference(env: str, kind: str, planner: str, seeds: tuple, action: tuple | None, max_steps: int) -> dict:
    """The ceiling (the actor acting itself) or the floor (a constant action) on `seeds`: model-free, so
    computed once per process for every model and σ that shares them."""
    from pipeline.sim.closed_loop import actor_policy, constant_policy, run_episodes

    act = actor_policy(env, planner) if kind == "actor" else constant_policy(np.asarray(action))
    got = run_episodes(env, act, list(seeds), planner=planner, needs_plan=False, max_steps=max_steps)
    return summarize(env, got)


def closed_loop_rows(
    predict,
    transitions,
    config: ClosedLoopConfig,
    *,
    mean_action: np.ndarray,
    obs_std: np.ndarray,
    k: int = 1,
    progress: bool = False,
    on_step=None,
) -> dict:
    """{"closed_loop": rows, "closed_loop_reason": None, "plan_return": ..., ...} for the IDM `predict(obs,
    plans)` (raw observations in, actions out), or closed_loop None with the reason.

    `mean_action` is the floor's action (the training part's mean), `obs_std` the dataset's observation
    std that scales the plan noise, `k` the model's jump (plans k actor steps ahead); `on_step` goes to
    `pipeline.sim.closed_loop.run_episodes`."""
    from pipeline.sim.closed_loop import episode_seeds, run_episodes

    config.validate()
    env, reason = closed_loop_env(transitions)
    if env is None:
        return {"closed_loop": None, "closed_loop_reason": reason, "plan_return": None}
    from tqdm.auto import tqdm

    seeds = episode_seeds(config.episodes, config.seeds)
    note = D4RL_PHYSICS_NOTE if not transitions.name.startswith("sim-") else None
    std = np.where(np.asarray(obs_std, np.float64) > 0, obs_std, 1.0)
    action = tuple(np.asarray(mean_action, float).tolist())
    floor = _reference(env, "floor", "expert", tuple(seeds), action, config.max_steps)
    total = len(config.planners) * len(config.plan_noise) * config.episodes * config.max_steps
    rows, steps, spent = [], 0, 0.0
    # disable=None: a bar on a terminal only, no carriage-return frames in a log file
    desc = f"closed loop {transitions.name}"
    off = None if progress else True
    with tqdm(total=total, desc=desc, unit="step", unit_scale=True, disable=off) as bar:
        for planner in config.planners:
            ceiling = _reference(env, "actor", planner, tuple(seeds), None, config.max_steps)
            for sigma in config.plan_noise:
                began = time.perf_counter()
                got = run_episodes(
                    env,
                    predict,
                    seeds,
                    planner=planner,
                    k=k,
                    plan_noise=float(sigma),
                    obs_std=std,
                    max_steps=config.max_steps,
                    bar=bar,
                    on_step=on_step,
                )
                spent += time.perf_counter() - began
                steps += got.steps
                rows.append(_row(env, planner, float(sigma), k, got, ceiling, floor, config.seeds, note))
    return {
        "closed_loop": rows,
        "closed_loop_reason": None,
        "plan_return": plan_return(rows),
        "closed_loop_steps_per_s": steps / spent if spent > 0 else None,
    }


def _row(env, planner, sigma, k, got, ceiling, floor, seeds, note) -> dict:
    mine = summarize(env, got)
    ratio = mine["return"] / ceiling["return"] if ceiling["return"] else None
    return {
        "planner": planner,
        "plan_noise": sigma,
        "episodes": len(got.seeds),
        "normalized_return": mine["normalized_return"],
        "normalized_return_ci95": mine["normalized_return_ci95"],
        "fall_rate": mine["fall_rate"],
        "actor_normalized_return": ceiling["normalized_return"],
        "baseline_normalized_return": floor["normalized_return"],
        "return_ratio": ratio,
        "return": mine["return"],
        "return_ci95": mine["return_ci95"],
        "actor_return": ceiling["return"],
        "actor_fall_rate": ceiling["fall_rate"],
        "baseline_return": floor["return"],
        "baseline_fall_rate": floor["fall_rate"],
        "mean_length": mine["mean_length"],
        "max_steps": int(got.max_steps),
        "jump": k,
        "env": env,
        "seeds": seeds,
        "physics_note": note,
    }


def plan_return(rows: list[dict] | None) -> float | None:
    """One number for a model's closed loop (higher is better): the mean of its rows' D4RL-normalized
    returns (raw returns for an env without reference scores)."""
    if not rows:
        return None
    values = [r["normalized_return"] if r["normalized_return"] is not None else r["return"] for r in rows]
    return float(np.mean(values))


def format_rows(rows: list[dict], dataset: str | None = None) -> list[str]:
    """Markdown table lines of closed-loop rows (with a dataset column when `dataset` is given)."""
    from pipeline.quality.metrics import fmt_number

    def num(v, spec=".1f"):
        return fmt_number(v, spec, missing="-")

    lead = "| dataset " if dataset is not None else ""
    out = [
        f"{lead}| planner | σ | return (D4RL-normalized) [95 % CI] | falls | actor | mean action | "
        "ratio to actor |",
        "|---" * (7 + (dataset is not None)) + "|",
    ]
    for r in rows:
        ci = r.get("normalized_return_ci95") or [None, None]
        cells = [dataset] if dataset is not None else []
        cells += [
            f"{r['planner']}" + (f" (k={r['jump']})" if r.get("jump", 1) > 1 else ""),
            format(r["plan_noise"], "g"),
            f"{num(r['normalized_return'])} [{num(ci[0])}, {num(ci[1])}]",
            f"{round(r['fall_rate'] * r['episodes'])}/{r['episodes']}",
            f"{num(r['actor_normalized_return'])} ({round(r['actor_fall_rate'] * r['episodes'])} falls)",
            num(r["baseline_normalized_return"]),
            num(r["return_ratio"], ".3f"),
        ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out
