"""CleanDiffuser's recipe, the baseline to beat, pinned; and how to train it on a given split."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

#: CleanDiffuser's recipe (the baseline to beat): FancyMlp h512 dropout 0.1, Adam 3e-4, batch 512, random
#: 80/20 transition split, early stopping with patience 3, last checkpoint kept
RECIPE = {
    "arch": "fancy_mlp",
    "hidden_dim": 512,
    "dropout": 0.1,
    "optimizer": "adam",
    "lr": 3e-4,
    "weight_decay": 0.0,
    "batch_size": 512,
    "max_epochs": 100,
    "min_delta": 0.0,
    "eval_every": None,
    "schedule": "none",
    "loss": "mse",
    "patience": 3,
    "split": "transitions",
    "val_fraction": 0.2,
    "test_fraction": 0.0,  # CleanDiffuser has no test part: the report scores it on the champion's test part
    "keep": "last",
    "ema": 0.0,  # the raw weights
    "precision": "fp32",  # CleanDiffuser trains in fp32 (bf16 inputs lose the small s' - s, see bench)
}


def subset(transitions, rows: np.ndarray, tag: str):
    """The transitions at `rows` (whole episodes, in order) as a dataset of their own.

    Its sha256 is derived from the parent's and the rows, so a model trained on it never claims the
    parent's data (evaluating it on the parent scores all rows, not a split it cannot know).
    """
    rows = np.asarray(rows)
    digest = hashlib.sha256(
        f"{transitions.sha256}:{tag}:".encode() + rows.astype(np.int64).tobytes()
    ).hexdigest()
    take = (lambda a: None) if transitions.qpos is None else (lambda a: a[rows])
    stats = {
        **transitions.stats,
        "sha256": digest,
        "subset_of": transitions.sha256,
        "subset": tag,
        "transitions": int(len(rows)),
        "episodes": int(len(np.unique(transitions.episode[rows]))),
    }
    return replace(
        transitions,
        obs=transitions.obs[rows],
        act=transitions.act[rows],
        next_obs=transitions.next_obs[rows],
        episode=transitions.episode[rows],
        qpos=take(transitions.qpos),
        qvel=None if transitions.qvel is None else transitions.qvel[rows],
        stats=stats,
    )


def train_recipe(
    transitions, train_rows: np.ndarray, out_dir, *, seed: int = 0, max_epochs: int | None = None, **overrides
):
    """Train CleanDiffuser's recipe (or it with `overrides`) on `train_rows` only; returns a TrainResult."""
    from pipeline.training.config import TrainConfig
    from pipeline.training.trainer import train

    config = {**RECIPE, **overrides, "seed": seed}
    if max_epochs is not None:
        config["max_epochs"] = max_epochs
    return train(subset(transitions, train_rows, "train"), TrainConfig(**config), out_dir)
