"""What decides an agent's training run (`AgentConfig`, one field per choice with its help) and the SAC
hyperparameters, taken from rl-zoo3."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.catalog import SIM_ENVS, DatasetError

#: rl-zoo3's tuned SAC hyperparameters for the MuJoCo envs (DLR-RM/rl-baselines3-zoo, hyperparams/sac.yml,
#: `&mujoco-defaults`: HalfCheetah / Ant / Hopper / Walker2d-v3 share them): SB3's SAC defaults (lr 3e-4,
#: buffer 1e6, batch 256, tau 0.005, gamma 0.99, one gradient step per env step, automatic entropy,
#: 256x256 ReLU nets) with 10k random warm-up steps and 1e6 steps in all. Written out here so the card says
#: exactly what ran.
SAC_HYPERPARAMS: dict = {
    "learning_rate": 3e-4,
    "buffer_size": 1_000_000,
    "learning_starts": 10_000,
    "batch_size": 256,
    "tau": 0.005,
    "gamma": 0.99,
    "train_freq": 1,
    "gradient_steps": 1,
    "ent_coef": "auto",
    "policy_kwargs": {"net_arch": [256, 256]},
}
#: rl-zoo3's n_timesteps for these envs
ZOO_STEPS = 1_000_000
#: D4RL's episode limit for the locomotion envs (and Gymnasium's for the v5 envs)
MAX_EPISODE_STEPS = 1000


def _option(default, text: str, choices: tuple | None = None):
    metadata = {"help": text} if choices is None else {"help": text, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass
class AgentConfig:
    """One agent's training run. It stops at `steps` env steps or `cpu_hours` of this process's CPU time
    (summed over resumed runs), whichever comes first, and resumes from RUN_DIR/<env>/ when run again."""

    env: str = ""
    steps: int = _option(ZOO_STEPS, "environment steps in all (rl-zoo3's n_timesteps)")
    cpu_hours: float = _option(2.0, "CPU-time budget in hours over all resumed runs (0: no limit)")
    seed: int = _option(0, "seed of the agent, its envs and its evaluations")
    run_dir: str = _option("runs/agents", "where checkpoints, the rollout record and the curve go")
    eval_every: int = _option(10_000, "env steps between evaluations (stochastic policy)")
    eval_episodes: int = _option(5, "episodes per evaluation")
    checkpoint_every: int = _option(10_000, "env steps between checkpoints (a cut run resumes from one)")
    medium_score: float = _option(
        40.0, "D4RL-normalized evaluation score at which the medium policy is saved (D4RL's medium: 30-60)"
    )
    threads: int = _option(1, "torch threads (SB3's SAC is fastest with 1 on 2 cores)")
    learning_starts: int = _option(
        SAC_HYPERPARAMS["learning_starts"], "random-action warm-up steps before SAC learns (rl-zoo3: 10000)"
    )

    @property
    def short_env(self) -> str:
        return short_env(self.env)

    @property
    def env_id(self) -> str:
        return SIM_ENVS[self.short_env]["env_id"]

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir).expanduser() / self.env_id

    def check(self) -> None:
        short_env(self.env)
        for name in ("steps", "eval_every", "eval_episodes", "checkpoint_every", "threads"):
            if getattr(self, name) <= 0:
                raise DatasetError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.cpu_hours < 0 or self.learning_starts < 0:
            raise DatasetError("--cpu-hours and --learning-starts must not be negative")


def short_env(env: str) -> str:
    """`Hopper-v5` or `hopper` -> `hopper` (a key of catalog.SIM_ENVS)."""
    for name, spec in SIM_ENVS.items():
        if env in (name, spec["env_id"]):
            return name
    choices = ", ".join(f"{s['env_id']} ({n})" for n, s in SIM_ENVS.items())
    raise DatasetError(f"unknown agent env {env!r}; choose one of {choices}")
