"""Evaluate an IDM on the test (or validation) episodes of a dataset: action errors, and what its actions
do in MuJoCo: `python -m pipeline.evaluate MODEL DATASET [--json] [--part test|val] [--horizon H]`.

MODEL is a model directory, a bundle (.zip path or URL), an MLflow `models:/...` URI or a model name in
the invdyn cache; DATASET anything `pipeline.data.sources.load_transitions` accepts. The scored rows are a
part of the split the model was trained with (re-derived from params.json["training"]): the command scores
the test part by default (the validation part for a model trained before test parts), `evaluate()` the
validation part unless told, because its callers choose between models (no choice may read test rows).
Physics metrics (see pipeline.sim.physics) run on the same part and are null, with a reason, when the
dataset has no recorded simulator state or no known environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from invdyn.errors import InvdynError
from invdyn.settings import dataset_model_name
from pipeline.data.transitions import jump_pairs
from pipeline.quality.closed_loop import ClosedLoopConfig, parse_floats, parse_names
from pipeline.quality.evaluation_card import attach_evaluation, card_section, format_table  # noqa: F401
from pipeline.quality.metrics import HEADLINE

PARTS = ("test", "val")
#: EvalConfig's closed-loop fields: the job's --eval-closed-loop-* flags (this command has --closed-loop)
CLOSED_LOOP_FIELDS = ("closed_loop_episodes", "closed_loop_noise", "closed_loop_planner")


@dataclass
class EvalConfig:
    """How a model is evaluated: the sample sizes of the MuJoCo metrics (one place for their defaults)."""

    horizon: int = field(default=32, metadata={"help": "closed-loop tracking horizon in steps"})
    starts: int = field(default=128, metadata={"help": "tracking start points sampled per model"})
    samples: int = field(default=2000, metadata={"help": "one-step transitions sampled per model"})
    seed: int = 0  # of the sampled start points and transitions
    # the job's closed loop (`pipeline.evaluate --closed-loop` has its own --episodes / --plan-noise flags)
    closed_loop_episodes: int = field(
        default=10, metadata={"help": "closed-loop episodes per (planner, σ) (0: no closed loop)"}
    )
    closed_loop_noise: str = field(
        default="0,0.05", metadata={"help": "plan-noise σ values of the closed loop", "metavar": "S,S"}
    )
    closed_loop_planner: str = field(
        default="expert", metadata={"help": "oracle planner(s) of the closed loop: expert, medium"}
    )

    def validate(self) -> None:
        if min(self.horizon, self.starts, self.samples) < 1:
            raise EvaluationError("--horizon, --starts and --samples must each be >= 1")
        if self.closed_loop_episodes < 0:
            raise EvaluationError("--eval-closed-loop-episodes must be >= 0 (0: no closed loop)")
        self.closed_loop("test")

    def closed_loop(self, seeds: str = "test") -> ClosedLoopConfig | None:
        """The closed loop these settings ask for on seed set `seeds`, or None (0 episodes)."""
        if self.closed_loop_episodes == 0:
            return None
        try:
            config = ClosedLoopConfig(
                plan_noise=parse_floats(self.closed_loop_noise),
                episodes=self.closed_loop_episodes,
                planners=parse_names(self.closed_loop_planner),
                seeds=seeds,
            )
            config.validate()
        except ValueError as e:
            raise EvaluationError(f"closed loop: {e}") from None
        return config


class EvaluationError(InvdynError, ValueError):
    """A model and a dataset that cannot be evaluated together (the message says why and what to do)."""


def check_dims(model, transitions) -> None:
    """Refuse a model whose obs/act dims differ from the dataset's, naming both."""
    if (model.obs_dim, model.act_dim) != (transitions.obs_dim, transitions.act_dim):
        raise EvaluationError(
            f"model {model.name or '?'!r} expects obs_dim={model.obs_dim}, act_dim={model.act_dim} but "
            f"dataset {transitions.name!r} has obs_dim={transitions.obs_dim}, act_dim={transitions.act_dim}: "
            "evaluate the model on the dataset it was trained for"
        )


def heldout_rows(transitions, params: dict, part: str | None = "val") -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, scored rows, description): `part` ("test" or "val"; None: test when the model has a
    test part, else val) of the split recorded in params.json["training"]. The description starts with the
    part's name: "test", "val" or "all".

    A model that records no split (e.g. a CleanDiffuser download) is scored on every row, and the
    description says so; asking a two-part model (trained before test parts) for "test" is refused.
    """
    if part not in (*PARTS, None):
        raise EvaluationError(f"part must be one of {list(PARTS)}, got {part!r}")
    training = (params or {}).get("training") or {}
    trained_on = ((params or {}).get("dataset") or {}).get("sha256")
    everything = np.arange(len(transitions))
    if not training.get("split"):
        return everything, everything, "all rows (the model records no training split)"
    if trained_on and transitions.sha256 and trained_on != transitions.sha256:
        return (
            everything,
            everything,
            "all rows (the model was trained on other data: dataset sha256 differs)",
        )
    from pipeline.training.split import split_from_training, split_settings

    train, val, test = (np.asarray(p) for p in split_from_training(transitions, training))
    kind = split_settings(training)[0]
    if part == "test" and not len(test):
        raise EvaluationError(
            f"model {params.get('name')!r} was trained without a test part (before three-way splits, or with "
            "test_fraction 0): evaluate --part val, or retrain it"
        )
    if part == "test" or (part is None and len(test)):
        return train, test, f"test part of the training split ({kind}; no choice read it)"
    return train, val, f"validation part of the training split ({kind})"


def part_of(description: str) -> str:
    """ "test", "val" or "all": the part a `heldout_rows` description names."""
    return description.split(" ", 1)[0].replace("validation", "val")


def action_metrics(pred: np.ndarray, act: np.ndarray, mean_action: np.ndarray, act_var: np.ndarray) -> dict:
    """MSE (raw units), normalized MSE (per-dim MSE / dataset action variance), per-dim MSE and R^2."""
    err = (pred.astype(np.float64) - act) ** 2
    base = (act.astype(np.float64) - mean_action) ** 2
    per_dim = err.mean(0)
    heldout_var = act.astype(np.float64).var(0)
    return {
        "heldout_mse": float(err.mean()),
        "baseline_mse": float(base.mean()),
        "heldout_mse_normalized": float((per_dim / act_var).mean()),
        "baseline_mse_normalized": float((base.mean(0) / act_var).mean()),
        "per_dim_mse": per_dim.tolist(),
        "per_dim_r2": (1.0 - per_dim / np.where(heldout_var > 0, heldout_var, np.nan)).tolist(),
    }


def evaluate(
    model,
    transitions,
    *,
    horizon: int = EvalConfig.horizon,
    rows: tuple[np.ndarray, np.ndarray, str] | None = None,
    physics: bool = True,
    one_step_samples: int = EvalConfig.samples,
    tracking_starts: int = EvalConfig.starts,
    seed: int = EvalConfig.seed,
    progress: bool = False,
    part: str | None = "val",
    closed_loop=None,
) -> dict:
    """All metrics of `model` (a PretrainedIDM) on `part` of `transitions` (see `heldout_rows`; "val" by
    default: a caller that chooses must never read test rows), as a JSON-able dict that says the part.

    `rows` = (train rows, scored rows, description) overrides the split recorded in the model (the bench
    uses it to score several models on the same test episodes). `closed_loop` (a
    `pipeline.quality.closed_loop.ClosedLoopConfig`) also runs oracle plans through the model in MuJoCo:
    its rows go under "closed_loop" (see that module; the episodes are its own seeds, not data rows).
    """
    from pipeline.sim.physics import physics_metrics

    check_dims(model, transitions)
    jump = model_jump(model.params)
    transitions = jump_pairs(transitions, jump)  # the (s_t, s_{t+k}) pairs it learned; k = 1: as they are
    if horizon < 1:
        raise EvaluationError(f"--horizon must be >= 1, got {horizon}")
    train, held, held_desc = rows if rows is not None else heldout_rows(transitions, model.params, part)
    if len(held) == 0:
        raise EvaluationError(f"dataset {transitions.name!r}: the held-out split is empty")
    act = transitions.act.astype(np.float64)
    mean_action = act[train].mean(0)
    if rows is not None:  # the caller's split: the variance of every row it does not score
        act_var = np.delete(act, held, axis=0).var(0) if len(held) < len(act) else act.var(0)
    else:
        act_var = act.var(0) if part_of(held_desc) == "all" else _fit_variance(transitions, model.params, act)
    act_var = np.where(act_var > 0, act_var, 1.0)

    def predict(obs, next_obs):
        out = [model.predict(obs[i : i + 65536], next_obs[i : i + 65536]) for i in range(0, len(obs), 65536)]
        return np.concatenate(out).astype(np.float64)

    result = {
        "model": model.name,
        "dataset": transitions.name,
        "part": part_of(held_desc),
        "heldout": held_desc,
        "heldout_transitions": int(len(held)),
        "heldout_episodes": int(len(np.unique(transitions.episode[held]))),
        **action_metrics(
            predict(transitions.obs[held], transitions.next_obs[held]), act[held], mean_action, act_var
        ),
    }
    if physics and jump > 1:
        reason = f"jump {jump}: the one-step and tracking metrics replay one step (k = 1 models only)"
        result.update({k: None for k in HEADLINE[3:]}, physics_reason=reason)
    elif physics:
        allowed = np.zeros(len(transitions), dtype=bool)
        allowed[held] = True
        result.update(
            physics_metrics(
                transitions,
                predict,
                model.normalizer.std,
                mean_action,
                allowed,
                horizon=horizon,
                one_step_samples=one_step_samples,
                tracking_starts=tracking_starts,
                seed=seed,
                progress=progress,
            )
        )
    else:
        result.update({k: None for k in HEADLINE[3:]}, physics_reason="physics not requested")
    if closed_loop is not None:
        result.update(_closed_loop(model, transitions, closed_loop, mean_action, jump, progress))
    return _finite(result)


def _closed_loop(model, transitions, config, mean_action, jump: int, progress: bool) -> dict:
    """The closed-loop rows of `model` (plans `jump` steps ahead, noise in the dataset's obs stds)."""
    from pipeline.quality.closed_loop import closed_loop_rows

    def predict(obs, plans):
        return model.predict(obs, plans)

    std = transitions.obs.astype(np.float64).std(0)
    return closed_loop_rows(
        predict, transitions, config, mean_action=mean_action, obs_std=std, k=jump, progress=progress
    )


def _fit_variance(transitions, params: dict, act: np.ndarray) -> np.ndarray:
    """Per-dimension action variance over the rows a choice may read (train + val), as training's."""
    from pipeline.training.split import split_from_training

    training = (params or {}).get("training") or {}
    if not training.get("split"):
        return act.var(0)
    train, val, test = split_from_training(transitions, training)
    return act[np.concatenate([train, val])].var(0) if len(test) else act.var(0)


def model_jump(params: dict) -> int:
    """k of a model of a_t = I(s_t, s_{t+k}) (params.json "jump", or its training's); 1 when unrecorded."""
    params = params or {}
    return int(params.get("jump") or (params.get("training") or {}).get("jump") or 1)


def _finite(obj):
    """JSON has no NaN: a metric that cannot be computed (R^2 of a constant action dim) becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def load_model(spec: str, dataset_spec: str = ""):
    """A PretrainedIDM from a model directory, bundle, URL, `models:/` URI or cached model name: cheap, so
    a command loads its model before its dataset (which may be simulated or downloaded first)."""
    import invdyn

    path = Path(spec).expanduser()
    if "://" in spec or spec.startswith(("models:/", "runs:/")) or path.is_file():
        if path.suffix == ".zip" and path.is_file():
            installed = invdyn.fetch(path, progress=False)
            if len(installed) == 1:  # a one-model bundle: that model, whatever its dataset is called
                return invdyn.load(installed[0], source=path)
        return invdyn.load(dataset_model_name(dataset_name(dataset_spec)), source=spec)
    if path.is_dir():
        return invdyn.read_model_dir(path)
    if spec.startswith(("/", ".", "~")) or "/" in spec:
        raise EvaluationError(
            f"model {spec} does not exist; MODEL is a model directory, a bundle .zip or URL, a models:/ URI "
            "or the name of a model in the invdyn cache (python -m invdyn list)"
        )
    return invdyn.load(spec)


def dataset_name(spec: str) -> str:
    """The name a dataset spec's data goes by (a catalog name or `minari:<id>` as given, a file's catalog
    name or stem), without reading, downloading or simulating anything."""
    from pipeline.data.catalog import entry_for_file, is_path_spec

    if not spec or spec.startswith("minari:") or not is_path_spec(spec):
        return spec or "model"
    entry = entry_for_file(spec)
    return entry["name"] if entry else Path(spec).stem
