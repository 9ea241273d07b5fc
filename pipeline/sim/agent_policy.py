"""Trained agents' actors read from safetensors and run with plain torch: the behaviour policy of the
sim-<env>-medium / -expert datasets. Neither generating data nor testing needs stable-baselines3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.catalog import DatasetError

#: The committed agents: AGENT_DIR/<env>/{medium,expert}.safetensors, medium_replay.npz, card.{md,json}
AGENT_DIR = Path(__file__).with_name("agent_weights")
#: the two policy checkpoints every agent has
CHECKPOINTS = ("medium", "expert")
#: SB3's SAC actor clamps the log standard deviation to this range (stable_baselines3/sac/policies.py)
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class SquashedGaussianActor(nn.Module):
    """SB3's SAC actor (`latent_pi` MLP with ReLU, `mu` and `log_std` heads), same state-dict names:
    a = tanh(mu + exp(log_std) * eps), in [-1, 1] (the env's box after scaling)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(width, act_dim)
        self.log_std = nn.Linear(width, act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.latent_pi(obs)
        return self.mu(latent), self.log_std(latent).clamp(LOG_STD_MIN, LOG_STD_MAX)

    @torch.no_grad()
    def act(self, obs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Actions in [-1, 1] for a batch of observations; `noise` (standard normal, same shape as the
        actions) samples the stochastic policy, None gives the deterministic (mean) action."""
        mu, log_std = self(torch.as_tensor(obs, dtype=torch.float32))
        if noise is not None:
            mu = mu + log_std.exp() * torch.as_tensor(noise, dtype=torch.float32)
        return torch.tanh(mu).numpy()


def save_actor(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the actor's tensors and its metadata (dims, hidden sizes, env, step...) as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().float() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"invdyn_agent": json.dumps(meta, sort_keys=True)})
    tmp.chmod(0o644)  # a committed file, readable like the rest of the tree
    tmp.replace(path)


def read_meta(path: Path) -> dict:
    """The metadata saved with an actor (obs_dim, act_dim, hidden, env_id, steps, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["invdyn_agent"])
    except FileNotFoundError:
        raise DatasetError(
            f"agent policy {path} does not exist; train it: python -m pipeline.agents"
        ) from None
    except (KeyError, ValueError, OSError) as e:
        raise DatasetError(
            f"{path} is not an invdyn agent policy ({type(e).__name__}: {e}); re-export it with "
            "`python -m pipeline.agents publish ENV`"
        ) from None


def load_actor(path: Path) -> tuple[SquashedGaussianActor, dict]:
    """The actor stored at `path` (safetensors: tensors only, no pickle) and its metadata."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    actor = SquashedGaussianActor(meta["obs_dim"], meta["act_dim"], list(meta["hidden"]))
    try:
        actor.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise DatasetError(f"{path}: weights do not match the actor its metadata describes: {e}") from None
    return actor.eval(), meta


def agent_path(env: str, checkpoint: str, root: Path | None = None) -> Path:
    """AGENT_DIR/<env>/<checkpoint>.safetensors (checkpoint: medium or expert)."""
    if checkpoint not in CHECKPOINTS:
        raise DatasetError(f"unknown agent checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}")
    return (root or AGENT_DIR) / env / f"{checkpoint}.safetensors"
