"""Behaviour policies for simulated datasets: open-loop action generators with different state coverage."""

# A policy turns a numpy Generator into one episode's actions at once: vectorized, so the physics, not the
# policy, sets the simulation speed; all randomness comes from that Generator, so a seed reproduces a
# dataset. Actions are produced in [-1, 1] and mapped onto the env's action box.

from __future__ import annotations

import functools

import numpy as np


def random_actions(rng: np.random.Generator, steps: int, dims: int, dt: float) -> np.ndarray:
    """Uniform over the box, independent per step: D4RL's `random` behaviour."""
    return rng.uniform(-1.0, 1.0, (steps, dims))


def ou_actions(rng: np.random.Generator, steps: int, dims: int, dt: float, theta: float = 0.15) -> np.ndarray:
    """Ornstein-Uhlenbeck noise: temporally correlated, so joints push one way for a while and go far.

    The recurrence x_t = a x_{t-1} + n_t (a = 1 - theta) runs a block of B steps per matrix product.
    """
    sigma = rng.uniform(0.2, 0.5)
    noise = rng.normal(0.0, sigma, (steps, dims))
    prev = rng.normal(0.0, sigma / np.sqrt(2 * theta), dims)  # start in the stationary distribution
    a, block = 1.0 - theta, 50
    decay, carry = _decay_matrix(block, a), a ** np.arange(1, block + 1)[:, None]
    x = np.empty((steps, dims))
    for start in range(0, steps, block):
        n = noise[start : start + block]
        x[start : start + len(n)] = decay[: len(n), : len(n)] @ n + carry[: len(n)] * prev
        prev = x[start + len(n) - 1]
    return x


@functools.lru_cache(maxsize=4)
def _decay_matrix(steps: int, a: float) -> np.ndarray:
    """Lower-triangular L[t, k] = a**(t - k): L @ n sums the decayed inputs of the recurrence."""
    lag = np.arange(steps)[:, None] - np.arange(steps)[None, :]
    return np.where(lag >= 0, a ** np.maximum(lag, 0), 0.0)


def gait_actions(rng: np.random.Generator, steps: int, dims: int, dt: float) -> np.ndarray:
    """Noisy periodic gait: per joint a sinusoid with a shared random frequency and its own phase.

    Coordinated oscillation makes the body run, hop, flip and fall in ways a memoryless random policy never
    reaches (high speeds, large joint excursions).
    """
    omega = 2 * np.pi * rng.uniform(0.8, 4.0) * dt  # radians per env step
    amp, phase = rng.uniform(0.4, 1.0, dims), rng.uniform(0, 2 * np.pi, dims)
    offset, noise = rng.uniform(-0.3, 0.3, dims), rng.uniform(0.05, 0.3)
    t = np.arange(steps)[:, None]
    return offset + amp * np.sin(omega * t + phase) + noise * rng.normal(size=(steps, dims))


def mixed_actions(rng: np.random.Generator, steps: int, dims: int, dt: float) -> np.ndarray:
    """Each episode is one of random / ou / gait, chosen at random: the union of their state distributions."""
    members = (random_actions, ou_actions, gait_actions)
    return members[int(rng.integers(len(members)))](rng, steps, dims, dt)


POLICIES = {"random": random_actions, "ou": ou_actions, "gait": gait_actions, "mixed": mixed_actions}


def episode_actions(name: str, rng: np.random.Generator, steps: int, low, high, dt: float) -> np.ndarray:
    """`steps` float32 actions of policy `name` for one episode, inside the box [low, high]."""
    try:
        make = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    low, high = np.asarray(low, float), np.asarray(high, float)
    u = np.clip(make(rng, steps, low.shape[0], dt), -1.0, 1.0)
    return ((high + low) / 2 + (high - low) / 2 * u).astype(np.float32)
