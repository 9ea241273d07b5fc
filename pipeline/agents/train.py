"""Training one agent with stable-baselines3's SAC: evaluations, the medium checkpoint, checkpoints a cut
run resumes from, the CPU-time budget, and the record of every rollout (pipeline.agents.record)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline.agents import record
from pipeline.agents.config import MAX_EPISODE_STEPS, SAC_HYPERPARAMS, AgentConfig
from pipeline.data.scores import normalized_score
from pipeline.sim.agent_policy import save_actor

STATE = "state.json"
#: the actor of the best evaluation after the medium checkpoint (see _Progress.evaluate)
BEST = "expert-best"


def _make_env(env_id: str):
    import gymnasium

    from pipeline.sim.rollout import log_mujoco_warnings

    log_mujoco_warnings()
    return gymnasium.make(env_id, max_episode_steps=MAX_EPISODE_STEPS)


def read_state(run: Path) -> dict:
    """The run's progress (steps, times, curve, medium step); an empty run's when there is none."""
    path = run / STATE
    if not path.is_file():
        return {"steps": 0, "wall_s": 0.0, "cpu_s": 0.0, "curve": [], "medium_step": None, "finished": False}
    return json.loads(path.read_text())


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def actor_meta(cfg: AgentConfig, state: dict, checkpoint: str, obs_dim: int, act_dim: int) -> dict:
    import stable_baselines3

    return {
        "env": cfg.short_env,
        "env_id": cfg.env_id,
        "checkpoint": checkpoint,
        "steps": int(state["steps"]),
        "obs_dim": int(obs_dim),
        "act_dim": int(act_dim),
        "hidden": list(SAC_HYPERPARAMS["policy_kwargs"]["net_arch"]),
        "algorithm": "SAC",
        "library": f"stable-baselines3 {stable_baselines3.__version__}",
    }


def export_actor(model, cfg: AgentConfig, state: dict, checkpoint: str) -> Path:
    """The SAC actor's tensors (no critic, no optimizer) as RUN/<checkpoint>.safetensors."""
    names = ("latent_pi.", "mu.", "log_std.")
    tensors = {k: v for k, v in model.actor.state_dict().items() if k.startswith(names)}
    obs_dim, act_dim = model.observation_space.shape[0], model.action_space.shape[0]
    path = cfg.run_path / f"{checkpoint}.safetensors"
    save_actor(path, tensors, actor_meta(cfg, state, checkpoint, obs_dim, act_dim))
    return path


def evaluate(model, env, episodes: int, seed: int) -> list[float]:
    """Returns of `episodes` episodes of the stochastic policy (what the datasets sample)."""
    returns = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=False)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def _refill_buffer(model, run: Path, steps: int) -> None:
    """Put the recorded transitions back into SAC's replay buffer (its own pickle is never saved)."""
    data = record.load(run / "rollouts", steps)
    if not data:
        return
    buf, n = model.replay_buffer, len(data["rewards"])
    done = data["terminals"] | data["timeouts"]
    buf.observations[:n, 0] = data["observations"]
    buf.next_observations[:n, 0] = data["next_observations"]
    buf.actions[:n, 0] = model.policy.scale_action(data["actions"])
    buf.rewards[:n, 0] = data["rewards"]
    buf.dones[:n, 0] = done
    buf.timeouts[:n, 0] = data["timeouts"] & ~data["terminals"]
    buf.pos, buf.full = n % buf.buffer_size, n >= buf.buffer_size


def _build(cfg: AgentConfig, state: dict):
    """A fresh SAC, or the last checkpoint's with its replay buffer refilled from the record."""
    import torch
    from stable_baselines3 import SAC

    torch.set_num_threads(cfg.threads)
    env = record.RecordingWrapper(_make_env(cfg.env_id))
    hyper = dict(SAC_HYPERPARAMS, learning_starts=cfg.learning_starts)
    hyper["buffer_size"] = min(hyper["buffer_size"], cfg.steps)
    if state["steps"] == 0:
        return SAC("MlpPolicy", env, seed=cfg.seed, device="cpu", verbose=0, **hyper), env
    record.truncate(cfg.run_path / "rollouts", state["steps"])
    # our own checkpoint, written by this code into the run folder (SB3's zip holds pickles: never load
    # one from elsewhere)
    model = SAC.load(
        cfg.run_path / state["checkpoint"], env=env, device="cpu", buffer_size=hyper["buffer_size"]
    )
    model.set_random_seed(cfg.seed + state["steps"])
    _refill_buffer(model, cfg.run_path, state["steps"])
    return model, env


class _Progress:
    """SB3 callback body: evaluations, the medium export, checkpoints and the budget, every few steps."""

    def __init__(self, cfg: AgentConfig, state: dict, env, log):
        self.cfg, self.state, self.env, self.log = cfg, state, env, log
        self.eval_env = _make_env(cfg.env_id)
        self.flushed = state["steps"]
        self.wall0, self.cpu0 = time.monotonic(), time.process_time()
        self.base_wall, self.base_cpu = state["wall_s"], state["cpu_s"]

    def times(self) -> tuple[float, float]:
        wall = self.base_wall + time.monotonic() - self.wall0
        return wall, self.base_cpu + time.process_time() - self.cpu0

    def on_step(self, model) -> bool:
        cfg, step = self.cfg, model.num_timesteps
        if step % cfg.eval_every == 0:
            self.evaluate(model, step)
        out_of_budget = cfg.cpu_hours > 0 and self.times()[1] >= cfg.cpu_hours * 3600
        if step % cfg.checkpoint_every == 0 or out_of_budget:
            self.checkpoint(model, step)
        return not out_of_budget

    def evaluate(self, model, step: int) -> None:
        returns = evaluate(
            model, self.eval_env, self.cfg.eval_episodes, self.cfg.seed + 10_000 * len(self.state["curve"])
        )
        mean = float(np.mean(returns))
        score = normalized_score(self.cfg.short_env, mean)
        wall, cpu = self.times()
        self.state["curve"].append(
            {
                "step": step,
                "wall_s": wall,
                "cpu_s": cpu,
                "return_mean": mean,
                "return_std": float(np.std(returns)),
                "normalized": score,
            }
        )
        self.log(f"step {step}: return {mean:.1f} (normalized {score:.1f}), cpu {cpu / 60:.1f} min")
        if self.state["medium_step"] is None and score >= self.cfg.medium_score:
            self.state["medium_step"] = step
            self.state["medium"] = self.state["curve"][-1]
            self.checkpoint(model, step)  # the record up to here is the medium-replay data
            export_actor(model, self.cfg, self.state, "medium")
            self.log(f"medium policy saved at step {step} (normalized {score:.1f})")
        # SAC's evaluations swing by tens of points between checkpoints, so the best-scoring actor after
        # medium is kept too; `publish` re-scores it on fresh episodes, so its card is not the lucky draw
        best = self.state.get("best")
        if self.state["medium_step"] is not None and (best is None or score > best["normalized"]):
            self.state["best"] = self.state["curve"][-1]
            export_actor(model, self.cfg, self.state | {"steps": step}, BEST)
            self.log(f"best expert so far saved at step {step} (normalized {score:.1f})")

    def checkpoint(self, model, step: int) -> None:
        run = self.cfg.run_path
        self.flushed += self.env.flush(run / "rollouts", self.flushed)
        assert self.flushed == step, (self.flushed, step)
        name = f"checkpoint-{step:09d}.zip"
        model.save(run / f".{name}")
        os.replace(run / f".{name}", run / name)
        old = self.state.get("checkpoint")
        wall, cpu = self.times()
        self.state.update(steps=step, wall_s=wall, cpu_s=cpu, checkpoint=name)
        export_actor(model, self.cfg, self.state, "expert")
        _write_json(run / STATE, self.state)
        if old and old != name:
            (run / old).unlink(missing_ok=True)


def train(cfg: AgentConfig, log=None) -> dict:
    """Train (or resume) the agent of `cfg` until its steps or CPU budget are spent; returns the state."""
    from stable_baselines3.common.callbacks import BaseCallback

    cfg.check()
    log = log or (lambda msg: print(msg, flush=True))  # flushed: a nohup'd run's log shows progress
    run = cfg.run_path
    run.mkdir(parents=True, exist_ok=True)
    state = read_state(run)
    state["config"] = dataclasses.asdict(cfg)
    if state["steps"] >= cfg.steps:
        log(f"{cfg.env_id}: already trained for {state['steps']} steps (--steps {cfg.steps})")
        return state
    model, env = _build(cfg, state)
    progress = _Progress(cfg, state, env, log)

    class Callback(BaseCallback):
        def _on_step(self) -> bool:
            return progress.on_step(self.model)

    log(f"{cfg.env_id}: training SAC from step {state['steps']} to {cfg.steps} in {run}")
    model.learn(total_timesteps=cfg.steps - state["steps"], callback=Callback(), reset_num_timesteps=False)
    if model.num_timesteps > progress.flushed:
        progress.checkpoint(model, model.num_timesteps)
    state["finished"] = state["steps"] >= cfg.steps
    _write_json(run / STATE, state)
    log(f"{cfg.env_id}: stopped at step {state['steps']} ({state['cpu_s'] / 3600:.2f} CPU hours)")
    return state
