"""Publishing a trained agent into the repository: its actors as safetensors (medium, expert), the replay
record of its training rollouts up to medium, and a card (JSON + Markdown + the return curve PNG)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.agents import record
from pipeline.agents.config import SAC_HYPERPARAMS, short_env
from pipeline.agents.train import BEST, read_state
from pipeline.data.catalog import SIM_ENVS, DatasetError
from pipeline.data.scores import normalized_score
from pipeline.machine import cpu_description
from pipeline.sim.agent_policy import AGENT_DIR, read_meta, save_actor
from pipeline.sim.agent_rollout import REPLAY_FILE, agent_chunk

#: what the card says about where it was trained (the CPU model is read from the machine)
MACHINE_NOTE = "CPU only, shared with other agents while measured"


def machine() -> str:
    return f"{os.cpu_count()}-core {cpu_description()['model']}, {MACHINE_NOTE}"


def replay_arrays(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The compact, exact record of recorded transitions: per episode its start state, length, whether it
    ended by termination and its return, plus every step's int16 action code."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))  # the last episode, cut at the medium step
    begins = np.concatenate([[0], ends[:-1]])
    return {
        "lengths": (ends - begins).astype(np.int32),
        "terminal": data["terminals"][ends - 1].astype(bool),
        "init_qpos": data["qpos"][begins],
        "init_qvel": data["qvel"][begins],
        "returns": np.add.reduceat(data["rewards"].astype(np.float64), begins),
        "action_codes": record.quantize(data["actions"]),
    }


def policy_returns(env: str, root: Path, checkpoint: str, episodes: int, seed: int = 12345) -> list[float]:
    """Returns of whole episodes of the exported actor (plain torch, stochastic), as the datasets see it."""
    chunk = agent_chunk(env, checkpoint, seed, 0, episodes * 1000, root=str(root))
    ends = np.flatnonzero(chunk["terminals"] | chunk["timeouts"]) + 1
    begins = np.concatenate([[0], ends[:-1]])
    returns = np.add.reduceat(chunk["rewards"].astype(np.float64), begins)
    return [float(r) for r in returns[:episodes]]


def _curve_png(state: dict, env: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in state["curve"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [p["normalized"] for p in state["curve"]], marker=".", label="evaluation (stochastic)")
    if state.get("medium_step"):
        ax.axvline(state["medium_step"], color="tab:orange", ls="--", label="medium checkpoint")
    ax.set(
        xlabel="environment steps", ylabel="D4RL-normalized return", title=f"SAC on {SIM_ENVS[env]['env_id']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: which actor `publish` ships as the expert: the best evaluation after medium, or the last checkpoint
EXPERT_CHOICES = ("best", "latest")


def publish(
    env: str, *, run_dir="runs/agents", out=None, eval_episodes: int = 10, expert: str = "best"
) -> Path:
    """Copy RUN_DIR/<env_id>'s actors into OUT/<env> (default: the committed AGENT_DIR), write the
    medium-replay record and the card; returns the folder. `expert="best"` ships the actor of the best
    evaluation after medium (when the run kept one), "latest" the last checkpoint's."""
    env = short_env(env)
    run = Path(run_dir).expanduser() / SIM_ENVS[env]["env_id"]
    state = read_state(run)
    if not (run / "expert.safetensors").is_file():
        raise DatasetError(f"{run} has no trained agent; run `python -m pipeline.agents train {env}` first")
    if expert not in EXPERT_CHOICES:
        raise DatasetError(f"--expert must be one of {', '.join(EXPERT_CHOICES)}, got {expert!r}")
    dest = Path(out).expanduser() / env if out else AGENT_DIR / env
    dest.mkdir(parents=True, exist_ok=True)
    # until the agent reaches the medium score, its latest policy and all its rollouts stand in for medium
    # (the card says so), so every sim-d4rl set can be generated from an agent in training
    medium_step = state.get("medium_step") or state["steps"]
    best = run / f"{BEST}.safetensors"
    chosen = "best" if expert == "best" and state.get("best") and best.is_file() else "latest"
    expert_src = best if chosen == "best" else run / "expert.safetensors"
    _copy_actor(expert_src, dest / "expert.safetensors", checkpoint="expert")
    if state.get("medium_step"):
        shutil.copyfile(run / "medium.safetensors", dest / "medium.safetensors")
    else:
        _copy_actor(
            run / "expert.safetensors", dest / "medium.safetensors", checkpoint="medium", provisional=True
        )
    scores = {c: _score(env, dest, c, eval_episodes) for c in ("medium", "expert")}
    data = record.load(run / "rollouts", medium_step)
    with open(dest / f".{REPLAY_FILE}.tmp", "wb") as f:
        np.savez_compressed(f, **replay_arrays(data))
    os.replace(dest / f".{REPLAY_FILE}.tmp", dest / REPLAY_FILE)
    _curve_png(state, env, dest / "returns.png")
    card = _card(env, state, scores) | {
        "expert_selection": chosen,
        "expert_selection_note": (
            "the actor of the best evaluation after the medium checkpoint (evaluations: "
            f"{state['config']['eval_episodes']} episodes each); the scores here are fresh episodes"
            if chosen == "best"
            else "the actor of the last checkpoint"
        ),
    }
    (dest / "card.json").write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    (dest / "card.md").write_text(_card_md(card))
    return dest


def _copy_actor(src: Path, dest: Path, **meta) -> None:
    """The actor at `src` written to `dest` with `meta` over its metadata (steps... kept)."""
    from safetensors.torch import load_file

    save_actor(dest, load_file(str(src)), read_meta(src) | meta)


def _score(env: str, dest: Path, checkpoint: str, episodes: int) -> dict:
    returns = policy_returns(env, dest.parent, checkpoint, episodes)
    mean = float(np.mean(returns))
    return {
        "steps": read_meta(dest / f"{checkpoint}.safetensors")["steps"],
        "episodes": len(returns),
        "return_mean": mean,
        "return_std": float(np.std(returns)),
        "normalized": normalized_score(env, mean),
    }


def _card(env: str, state: dict, scores: dict) -> dict:
    import gymnasium
    import mujoco
    import stable_baselines3
    import torch

    return {
        "env_id": SIM_ENVS[env]["env_id"],
        "algorithm": "SAC",
        "library": {
            "stable-baselines3": stable_baselines3.__version__,
            "torch": torch.__version__,
            "gymnasium": gymnasium.__version__,
            "mujoco": mujoco.__version__,
        },
        "hyperparameters": SAC_HYPERPARAMS | {"learning_starts": state["config"]["learning_starts"]},
        "hyperparameters_source": "rl-zoo3 hyperparams/sac.yml, MuJoCo &mujoco-defaults",
        "steps": state["steps"],
        "steps_planned": state["config"]["steps"],
        "finished": state["steps"] >= state["config"]["steps"],
        "cpu_hours_budget": state["config"]["cpu_hours"],
        "medium_reached": bool(state.get("medium_step")),
        "medium_step": state.get("medium_step") or state["steps"],
        "medium_score_threshold": state["config"]["medium_score"],
        "wall_s": round(state["wall_s"], 1),
        "cpu_s": round(state["cpu_s"], 1),
        "machine": machine(),
        "seed": state["config"]["seed"],
        "scores": scores,
        "replay_transitions": state.get("medium_step") or state["steps"],
        "curve": state["curve"],
    }


def _card_md(card: dict) -> str:
    rows = [
        f"| {k} | {v['steps']:,} | {v['return_mean']:.1f} ± {v['return_std']:.1f} | {v['normalized']:.1f} |"
        for k, v in card["scores"].items()
    ]
    budget = card.get("cpu_hours_budget") or 0
    if card["finished"]:
        status = "finished"
    elif budget and card["cpu_s"] >= budget * 3600:
        status = f"stopped by the {budget:g} CPU-hour budget ({card['steps_planned']:,} planned)"
    else:
        status = f"not finished ({card['steps']:,} of {card['steps_planned']:,})"
    lib = ", ".join(f"{k} {v}" for k, v in card["library"].items())
    return "\n".join(
        [
            f"# {card['algorithm']} agent for {card['env_id']}",
            "",
            f"- library: {lib}",
            f"- hyperparameters ({card['hyperparameters_source']}): `{json.dumps(card['hyperparameters'])}`",
            f"- steps: {card['steps']:,}, {status}; medium checkpoint at step {card['medium_step']:,}"
            + ("" if card["medium_reached"] else " (PROVISIONAL: the medium score is not reached yet)"),
            f"- expert: {card.get('expert_selection_note', 'the actor of the last checkpoint')}, "
            f"step {card['scores']['expert']['steps']:,}",
            f"- wall time {card['wall_s'] / 3600:.2f} h, CPU time {card['cpu_s'] / 3600:.2f} h",
            f"- machine: {card['machine']}",
            f"- command: `python -m pipeline.agents train {card['env_id']}` then `publish {card['env_id']}`",
            "",
            "Returns of the exported actor (plain torch, stochastic policy, as the datasets sample it):",
            "",
            "| checkpoint | steps | return (mean ± std) | D4RL-normalized |",
            "|---|---|---|---|",
            *rows,
            "",
            "![returns](returns.png)",
            "",
        ]
    )
