"""D4RL's reference returns (random / expert policy per locomotion env) and the normalized score planners
report: 100 * (return - random) / (expert - random)."""

from __future__ import annotations

#: env (short name, as in catalog.SIM_ENVS) -> (random return, expert return), from D4RL's
#: d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE (the same for every dataset of an env)
D4RL_REFERENCE: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


def normalized_score(env: str | None, episode_return: float) -> float | None:
    """D4RL-normalized score of a raw return (0 = random, 100 = D4RL's expert); None for an env without
    reference scores."""
    if env not in D4RL_REFERENCE:
        return None
    low, high = D4RL_REFERENCE[env]
    return 100.0 * (float(episode_return) - low) / (high - low)


def env_of(name: str | None) -> str | None:
    """The locomotion env a dataset name belongs to (`hopper-medium-v2`, `sim-walker2d-expert-v0`), if any."""
    if not name:
        return None
    parts = name.split("-")
    if parts[0] == "sim" and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if parts[0] in D4RL_REFERENCE else None
