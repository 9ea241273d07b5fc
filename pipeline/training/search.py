"""The search space: which training configs a job tries per dataset.

Without `--search` a dataset gets one trial (the trainer's defaults, i.e. CleanDiffuser's recipe with our
fixes). `--search` adds the grid hidden_dim {256, 512, 1024} x dropout {0, 0.1, 0.2}; `--search-space`
takes any grid as JSON (`{"hidden_dim": [256, 512], "lr": [1e-3, 3e-4], "arch": ["fancy_mlp", "mlp"]}`),
whose keys must be `TrainConfig` fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

from invdyn.errors import InvdynError
from pipeline.training.config import TrainConfig

DEFAULT_GRID: dict[str, list] = {"hidden_dim": [256, 512, 1024], "dropout": [0.0, 0.1, 0.2]}
#: hidden x hidden layers of res_mlp as the trainer builds it (2 residual blocks of 2 layers each)
RES_MLP_HIDDEN_LAYERS = 4


class SearchSpaceError(InvdynError, ValueError):
    """A search space that names no TrainConfig field or gives no values."""


def train_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def parse_space(text: str | None, *, search: bool) -> dict[str, list]:
    """The grid to search: `--search-space` JSON if given, else the default grid with `--search`, else {}."""
    if not text:
        return dict(DEFAULT_GRID) if search else {}
    try:
        space = json.loads(text)
    except json.JSONDecodeError as e:
        raise SearchSpaceError(
            f"--search-space is not valid JSON ({e}); example: '{json.dumps(DEFAULT_GRID)}'"
        ) from None
    if not isinstance(space, dict) or not space:
        raise SearchSpaceError("--search-space must be a JSON object of field -> list of values")
    known = train_config_fields()
    for key, values in space.items():
        if key not in known:
            raise SearchSpaceError(
                f"--search-space key {key!r} is not a TrainConfig field; known: {sorted(known)}"
            )
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(f"--search-space[{key!r}] must be a non-empty list of values")
    return space


def grid_points(space: dict[str, list]) -> list[dict]:
    """Every combination of the grid, in a stable order ([{}] for an empty grid: one default trial)."""
    keys = sorted(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]


#: TrainConfig fields added after jobs already ran, with the value that trains as before: left out of a
#: trial's key at that value, so `--resume` of an older job still finds its finished trials
KEY_NEUTRAL_FIELDS = {"delta_input": False, "target_noise": 0.0, "obs_noise": 0.0}


def trial_key(dataset: str, dataset_sha256: str, config: dict) -> str:
    """A stable id for one (dataset content, full training config): `--resume` skips keys already done."""
    config = {k: v for k, v in config.items() if KEY_NEUTRAL_FIELDS.get(k, object()) != v}
    blob = json.dumps(
        {"dataset": dataset, "sha256": dataset_sha256, "config": config}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def estimated_cost(config: dict, info: dict) -> float:
    """Relative FLOPs of a trial at its full epoch budget (transitions x epochs x the hidden layers' size):
    enough to start the longest trials first, which keeps the end of a job from waiting on one of them."""
    h = int(config.get("hidden_dim") or 512)
    inputs = 3 if config.get("delta_input") else 2  # s' - s as a third input (TrainConfig.delta_input)
    dims = int(info.get("obs_dim") or 0) * inputs + int(info.get("act_dim") or 0)
    hidden_layers = RES_MLP_HIDDEN_LAYERS if config.get("arch") == "res_mlp" else 1
    per_sample = h * dims + hidden_layers * h * h
    return float(info.get("transitions") or 0) * int(config.get("max_epochs") or 1) * per_sample
