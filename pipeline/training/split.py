"""The train / validation / test split: a pure function of the episode ids, the split kind, the fractions and
the seed, so that evaluation re-creates exactly the validation and test episodes a model never trained on."""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.training.config import SPLITS, TrainConfigError


def split_indices(transitions_or_episodes, split: str = "episodes", val_fraction: float = 0.2, seed: int = 0):
    """`(train_idx, val_idx)`, the two-part split of models trained before the test part existed.

    "episodes": a seeded shuffle of the distinct episode ids; the first round(fraction * episodes) (at
    least 1, at most all but one) are held out whole. "transitions": a seeded shuffle of all rows,
    CleanDiffuser's random 80/20. Pass Transitions or the episode-id array itself.
    """
    episode = _episode_ids(transitions_or_episodes, split)
    if not 0 < val_fraction < 1:
        raise TrainConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    n = episode.shape[0]
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


def split_parts(
    transitions_or_episodes,
    split: str = "episodes",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    name: str | None = None,
):
    """`(train_idx, val_idx, test_idx)`, sorted int64 row arrays: a pure function of (episode ids, split,
    fractions, seed).

    "episodes": a seeded shuffle of the distinct episode ids; the first round(test_fraction * episodes) are
    the test part, the next round(val_fraction * episodes) the validation part (each at least one episode,
    training keeps at least one), the rest train. "transitions": the same cut over shuffled rows. With
    `test_fraction` 0 the test part is empty and (train, val) is `split_indices`' two-part split.
    A dataset too small for three parts is refused, never split into fewer.
    """
    if not (isinstance(test_fraction, (int, float)) and 0 <= test_fraction < 1):
        raise TrainConfigError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if test_fraction == 0:
        train, val = split_indices(transitions_or_episodes, split, val_fraction, seed)
        return train, val, np.zeros(0, np.int64)
    episode = _episode_ids(transitions_or_episodes, split)
    if not 0 < val_fraction < 1 or val_fraction + test_fraction >= 1:
        raise TrainConfigError(
            f"val_fraction must be in (0, 1) and val_fraction + test_fraction < 1, got {val_fraction!r} + "
            f"{test_fraction!r}"
        )
    units = np.arange(episode.shape[0]) if split == "transitions" else np.unique(episode)
    n = int(units.shape[0])
    if n < 3:
        what = "transitions" if split == "transitions" else "episodes"
        data = name or getattr(transitions_or_episodes, "name", None) or "the data"
        fix = (
            "--test-fraction 0 (no test part, so no test metrics)"
            if split == "transitions"
            else "--split transitions (a random three-way split of transitions) or --test-fraction 0 (no "
            "test part, so no test metrics)"
        )
        raise TrainConfigError(
            f"dataset {data!r} has {n} {what}: a train / validation / test split needs at least 3; use {fix}"
        )
    n_test = min(max(round(test_fraction * n), 1), n - 2)
    n_val = min(max(round(val_fraction * n), 1), n - 1 - n_test)
    order = np.random.default_rng(seed).permutation(units)
    test_units, val_units = order[:n_test], order[n_test : n_test + n_val]
    if split == "transitions":
        is_test, is_val = np.zeros(n, bool), np.zeros(n, bool)
        is_test[test_units], is_val[val_units] = True, True
    else:
        is_test, is_val = np.isin(episode, test_units), np.isin(episode, val_units)
    train = np.flatnonzero(~(is_test | is_val))
    return (
        train.astype(np.int64),
        np.flatnonzero(is_val).astype(np.int64),
        np.flatnonzero(is_test).astype(np.int64),
    )


def checked_split(transitions, config):
    """(train rows, validation rows, test rows) of `config`'s split, after refusing a config or data that
    cannot train (before any file)."""
    n = len(transitions)
    if n == 0:
        raise TrainConfigError(f"dataset {transitions.name!r} has no transitions")
    if not all(np.isfinite(a).all() for a in (transitions.obs, transitions.next_obs, transitions.act)):
        raise TrainConfigError(f"dataset {transitions.name!r} contains NaN or inf in obs/next_obs/actions")
    train_idx, val_idx, test_idx = split_parts(
        transitions,
        config.split,
        config.val_fraction,
        config.test_fraction,
        config.resolved_split_seed(),
        name=transitions.name,
    )
    if config.batch_size > train_idx.shape[0]:
        raise TrainConfigError(
            f"batch_size={config.batch_size} is larger than the training split ({train_idx.shape[0]} of "
            f"{n} transitions of {transitions.name!r}); use a smaller --batch-size"
        )
    return train_idx, val_idx, test_idx


def _episode_ids(transitions_or_episodes, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise TrainConfigError(f"split={split!r} is not one of {list(SPLITS)}")
    episode = getattr(transitions_or_episodes, "episode", transitions_or_episodes)
    return np.asarray(episode).reshape(-1)


def split_digest(idx) -> str:
    """Short fingerprint of one part's rows, stored so a re-computed split can be checked."""
    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def split_record(transitions, kind: str, val_fraction: float, test_fraction: float, seed: int, parts) -> dict:
    """params.json's `training.split`: per-part episode and transition counts, the test episodes' ids
    (0-based, file order, as the reader cut them), the seed, the fractions and a digest of each part."""
    episode = np.asarray(transitions.episode)
    record = {"kind": kind, "seed": int(seed), "val_fraction": val_fraction, "test_fraction": test_fraction}
    for part, idx in zip(("train", "val", "test"), parts, strict=True):
        record[f"{part}_episodes"] = int(np.unique(episode[idx]).shape[0])
        record[f"{part}_transitions"] = int(len(idx))
        record[f"{part}_digest"] = split_digest(idx)
    record["test_episode_ids"] = np.unique(episode[parts[2]]).astype(int).tolist()
    record["val_episode_ids"] = np.unique(episode[parts[1]]).astype(int).tolist()
    return record


def split_settings(training: dict) -> tuple[str, float, float, int]:
    """(kind, val_fraction, test_fraction, seed) of the split a params.json "training" section (or a
    TrainConfig dict) records; a two-part model (written before the test part) has test_fraction 0."""
    split = training.get("split")
    if isinstance(split, dict):
        return split["kind"], split["val_fraction"], split["test_fraction"], split["seed"]
    kind = training.get("split_kind") or split
    seed = training.get("split_seed")
    seed = training["seed"] if seed is None else seed
    return kind, training["val_fraction"], training.get("test_fraction", 0.0), seed


def split_from_training(transitions, training: dict):
    """`(train_idx, val_idx, test_idx)` re-created from a model's params.json["training"] (two-part models:
    an empty test part); checks each recorded fingerprint."""
    try:
        kind, val_fraction, test_fraction, seed = split_settings(training)
    except KeyError as e:
        raise TrainConfigError(
            f"params.json 'training' lacks key {e} needed to re-create the split"
        ) from None
    parts = split_parts(transitions, kind, val_fraction, test_fraction, seed)
    split = training.get("split") if isinstance(training.get("split"), dict) else {}
    recorded = {
        "val": split.get("val_digest") or (training.get("split_info") or {}).get("val_digest"),
        "test": split.get("test_digest"),
    }
    for part, idx in zip(("val", "test"), parts[1:], strict=True):
        if recorded[part] and recorded[part] != split_digest(idx):
            name = getattr(transitions, "name", "this data")
            raise TrainConfigError(
                f"the {part} part re-created for {name!r} differs from the one the model was trained with "
                "(different data or episode ids); evaluate on the dataset it was trained on"
            )
    return parts
