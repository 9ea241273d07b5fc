"""The train / held-out split: a pure function of the episode ids, the split kind, the fraction and the seed,
so that evaluation re-creates exactly the held-out episodes a model never trained on."""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.training.config import SPLITS, TrainConfigError


def split_indices(transitions_or_episodes, split: str = "episodes", val_fraction: float = 0.2, seed: int = 0):
    """`(train_idx, val_idx)`, sorted int64 arrays: a pure function of (episode ids, split, fraction, seed).

    "episodes": a seeded shuffle of the distinct episode ids; the first round(fraction * episodes) (at
    least 1, at most all but one) are held out whole. "transitions": a seeded shuffle of all rows,
    CleanDiffuser's random 80/20. Pass Transitions or the episode-id array itself.
    """
    episode = getattr(transitions_or_episodes, "episode", transitions_or_episodes)
    episode = np.asarray(episode).reshape(-1)
    n = episode.shape[0]
    if split not in SPLITS:
        raise TrainConfigError(f"split={split!r} is not one of {list(SPLITS)}")
    if not 0 < val_fraction < 1:
        raise TrainConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    if split == "transitions":
        if n < 2:
            raise TrainConfigError(f"need at least 2 transitions to split, got {n}")
        n_val = min(max(round(val_fraction * n), 1), n - 1)
        val = np.sort(rng.permutation(n)[:n_val])
        mask = np.ones(n, bool)
        mask[val] = False
        return np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)
    episodes = np.unique(episode)
    if episodes.shape[0] < 2:
        raise TrainConfigError(
            f"split='episodes' needs at least 2 episodes but the data has {episodes.shape[0]}; "
            "use split='transitions' (--split transitions) for single-episode data"
        )
    n_val = min(max(round(val_fraction * episodes.shape[0]), 1), episodes.shape[0] - 1)
    val_eps = np.sort(rng.permutation(episodes)[:n_val])
    is_val = np.isin(episode, val_eps)
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def split_digest(val_idx) -> str:
    """Short fingerprint of a held-out set, stored so a re-computed split can be checked."""
    return hashlib.sha256(np.asarray(val_idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def split_from_training(transitions, training: dict):
    """Re-create the split a model was trained with from its params.json["training"]; checks the
    fingerprint."""
    try:
        train_idx, val_idx = split_indices(
            transitions, training["split"], training["val_fraction"], training["seed"]
        )
    except KeyError as e:
        raise TrainConfigError(
            f"params.json 'training' lacks key {e} needed to re-create the split"
        ) from None
    info = training.get("split_info") or {}
    if info.get("val_digest") and info["val_digest"] != split_digest(val_idx):
        name = getattr(transitions, "name", "this data")
        raise TrainConfigError(
            f"the held-out set re-created for {name!r} differs from the one the model was trained with "
            "(different data or episode ids); evaluate on the dataset it was trained on"
        )
    return train_idx, val_idx
