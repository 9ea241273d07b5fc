"""Small synthetic data and configs shared by the training, population and closed-loop tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.float_order import assert_weights_follow, initial_weights
from pipeline.data.transitions import Transitions
from pipeline.training.config import TrainConfig


def linear_transitions(
    episodes=20, length=50, obs_dim=5, act_dim=2, seed=0, noise_actions=False
) -> Transitions:
    """next_obs = obs + B @ act (+ small noise): the action is recoverable from the state change.

    With noise_actions the actions are independent of the states, so a model can only memorize them
    (its validation MSE gets worse as it trains: a planted loss curve with an early minimum).
    """
    rng = np.random.default_rng(seed)
    n = episodes * length
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32) * 3 + 1
    act = rng.uniform(-0.9, 0.9, size=(n, act_dim)).astype(np.float32)
    b = rng.normal(size=(act_dim, obs_dim)).astype(np.float32)
    nxt = obs + act @ b + 0.01 * rng.normal(size=(n, obs_dim)).astype(np.float32)
    if noise_actions:
        act = rng.uniform(-0.9, 0.9, size=(n, act_dim)).astype(np.float32)
    episode = np.repeat(np.arange(episodes), length).astype(np.int64)
    return Transitions(
        "synthetic-linear", obs, act, nxt.astype(np.float32), episode, stats={"sha256": "0" * 64}
    )


def small(**kw) -> TrainConfig:
    base = dict(
        hidden_dim=64, batch_size=64, max_epochs=3, device="cpu", precision="fp32", threads=1, min_epochs=0
    )
    return TrainConfig(**{**base, **kw})


def weights(result) -> dict:
    """The saved state dict of a trained model (a TrainResult or PopulationResult member)."""
    return torch.load(result.model_dir / "model.ckpt", weights_only=True)["state_dict"]


def assert_same_path(member, alone, data, config):
    """Same learning curve (to 1e-4), same steps and stop, weights equal to float32 rounding (measured
    against how far training moved them: `helpers.float_order`), same fp32 metrics."""
    assert len(member.curve) == len(alone.curve)
    assert [r["step"] for r in member.curve] == [r["step"] for r in alone.curve]
    for key in ("val_mse", "train_loss"):
        assert [r[key] for r in member.curve] == pytest.approx([r[key] for r in alone.curve], rel=1e-4), key
    assert_weights_follow(weights(member), weights(alone), initial_weights(data, config))
    for key in ("steps", "best_step", "stopped_early"):
        assert member.metrics[key] == alone.metrics[key], key
    assert member.metrics["heldout_mse"] == pytest.approx(alone.metrics["heldout_mse"], rel=1e-4)
