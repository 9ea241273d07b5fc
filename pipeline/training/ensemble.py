"""Ensembles: train K seeds into one ensemble directory (`write_ensemble` assembles finished members), and
measure on held-out rows whether the spread predicts the error and the score spots infeasible pairs."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

from invdyn._files import atomic_dir, write_json
from invdyn.ensemble import (
    ENSEMBLE_KEY,
    UNCERTAINTY_KEY,
    EnsembleIDM,
    ErrorModel,
    check_compatible,
    error_features,
    error_model_entry,
    fit_dynamics,
    write_member,
)
from invdyn.errors import FormatError
from invdyn.model_dir import CARD_FILE, PARAMS_FILE, card_figures, model_card, read_model_dir
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.split import split_from_training, split_settings

#: the state noise levels of the feasibility test, as fractions of each state dimension's std
NOISE_LEVELS = (0.01, 0.05, 0.20)


def write_ensemble(out, member_dirs, *, transitions=None) -> Path:
    """One ensemble directory at `out` from finished model directories (member 0's files, params and card
    on top, the others' weights beside them). With `transitions` (the members' data), the feasibility
    score is calibrated on member 0's split: its one-step model on the training rows, the typical spread
    on the validation rows."""
    out, dirs = Path(out), [Path(d) for d in member_dirs]
    if any(out.resolve() == d.resolve() for d in dirs):
        raise FormatError(f"--out {out} is one of the members; write the ensemble to a new directory")
    members = [read_model_dir(d) for d in dirs]  # each checked: checksums, shapes
    for d, m in zip(dirs, members, strict=True):
        if isinstance(m, EnsembleIDM):
            raise FormatError(f"{d} is already an ensemble; give single-model directories as members")
    check_compatible(members, [str(d) for d in dirs])
    params = dict(members[0].params)
    with atomic_dir(out) as tmp:
        for path in sorted(dirs[0].iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name not in (PARAMS_FILE, CARD_FILE):
                shutil.copyfile(path, tmp / path.name)
        entries = [write_member(tmp, i, m) for i, m in enumerate(members)]
        params[ENSEMBLE_KEY] = {"members": entries, "spread_ref": None}
        write_json(tmp / PARAMS_FILE, params)
        (tmp / CARD_FILE).write_text(model_card(params, card_figures(tmp)))
    if transitions is not None:
        training = members[0].params.get("training") or {}
        train_idx, val_idx, test_idx = split_from_training(transitions, training)
        calibrate(out, transitions, train_idx, val_idx)
        if test_idx.size and _one_split(members):
            stats = measure(read_model_dir(out), transitions, test_idx)
            protocol = (
                f"Measured when the ensemble was written, on the {test_idx.size} transitions of its "
                f"test episodes ({split_settings(training)[2]:.0%} of the episodes), which no member trained "
                "on and no choice read; the members share one split."
            )
            attach_uncertainty(out, stats, protocol)
    return out


def _one_split(members) -> bool:
    """Whether every member was trained on the same split (same validation and test digests)."""

    def digests(m):
        split = (m.params.get("training") or {}).get("split")
        return (split.get("val_digest"), split.get("test_digest")) if isinstance(split, dict) else None

    first = digests(members[0])
    return first is not None and all(digests(m) == first for m in members[1:])


def update_params(model_dir, checked_params: dict | None = None, **keys) -> dict:
    """Set top-level params.json keys of a model directory and re-render its card; returns the params.
    `checked_params`: the directory's params as read (and checked) just before, when a file it names is
    being replaced along with them."""
    model_dir = Path(model_dir)
    # checks the directory (weights included) first
    params = dict(checked_params) if checked_params is not None else read_model_dir(model_dir).params
    params.update(keys)
    write_json(model_dir / PARAMS_FILE, params)
    (model_dir / CARD_FILE).write_text(model_card(params, card_figures(model_dir)))
    return params


def calibrate(model_dir, transitions, train_rows, val_rows) -> dict:
    """Record the feasibility score's calibration (the linear one-step model fitted on `train_rows`, the
    median per-dimension spread on real pairs `val_rows`) and the error model fitted on `val_rows`; returns
    params.json's new "ensemble"."""
    model = read_model_dir(model_dir)
    nz, t = model.normalizer, transitions
    dynamics = fit_dynamics(
        nz.normalize(t.obs[train_rows]), t.act[train_rows], nz.normalize(t.next_obs[train_rows])
    )
    mean, std = model.predict(t.obs[val_rows], t.next_obs[val_rows], return_std=True)
    ref = np.maximum(np.median(std, axis=0), 1e-8)
    features = error_features(
        nz.normalize(t.obs[val_rows]), nz.normalize(t.next_obs[val_rows]), mean, std, ref
    )
    error_model, epochs = fit_error_model(features, (mean - t.act[val_rows]) ** 2)
    fitted = {"fitted_on": "validation pairs", "rows": int(len(val_rows)), "epochs": epochs}
    entry = {
        **model.params[ENSEMBLE_KEY],
        "spread_ref": ref.astype(float).tolist(),
        "dynamics": dynamics,
        "error_model": error_model_entry(error_model, Path(model_dir), **fitted),
    }
    update_params(model_dir, model.params, **{ENSEMBLE_KEY: entry})  # checked above, before the new file
    return entry


def fit_error_model(features, sq_error, *, hidden: int = 128, max_epochs: int = 200, patience: int = 15):
    """The ErrorModel for pairs' `features` and the members' mean's squared error per action dimension:
    Gaussian likelihood of the error under the predicted log variance, early-stopped on a fifth of the
    rows (seeded: the same rows give the same weights). Returns (model, epochs run)."""
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    err = torch.as_tensor(np.asarray(sq_error, dtype=np.float32))
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ErrorModel(x.shape[1], err.shape[1], hidden)
    model.feature_mean.copy_(x.mean(0))
    model.feature_std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    order = torch.randperm(len(x), generator=gen)
    cut = max(1, int(0.8 * len(x)))
    fit, hold = order[:cut], order[cut:] if cut < len(x) else order[:cut]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def nll(rows):  # -log N(e; 0, exp(z)) up to constants, per dimension
        z = model(x[rows])
        return (torch.exp(-z) * err[rows] + z).mean()

    best, best_state, stale, epochs = float("inf"), None, 0, 0
    for epoch in range(1, max_epochs + 1):
        epochs = epoch
        shuffled = fit[torch.randperm(len(fit), generator=gen)]
        for i in range(0, len(shuffled), 256):
            loss = nll(shuffled[i : i + 256])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            held = float(nll(hold))
        if held < best - 1e-4:
            best, best_state, stale = held, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), epochs


def train_ensemble(transitions, config: TrainConfig, out, k: int, *, on_eval=None, dataset_name=None):
    """Train `k` members (seeds seed .. seed+k-1: initial weights and batches) on one split (the config's
    split seed) and write them as one ensemble at `out`; returns (out, [TrainResult per member])."""
    from pipeline.training.trainer import train

    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise TrainConfigError(f"--ensemble must be an integer >= 2 (members), got {k!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.members-", dir=out.parent))
    split_seed = config.seed if config.split_seed is None else config.split_seed
    try:
        results = []
        for i in range(k):
            member = dataclasses.replace(config, seed=config.seed + i, split_seed=split_seed)
            results.append(
                train(transitions, member, work / str(i), on_eval=on_eval, dataset_name=dataset_name)
            )
        write_ensemble(out, [r.model_dir for r in results], transitions=transitions)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, results


def measure(model: EnsembleIDM, transitions, rows, *, seed: int = 0) -> dict:
    """On held-out `rows`: single-member vs ensemble MSE, the spread-error rank correlation and the
    feasibility AUROC against (s, s'') of the same episode and against s' + noise at NOISE_LEVELS."""
    rows = np.asarray(rows)
    obs, nxt, act = transitions.obs[rows], transitions.next_obs[rows], transitions.act[rows]
    preds = np.stack([net.predict(*_normalized(model, obs, nxt)) for net in model.members])
    member_mse = float(((preds - act) ** 2).mean())
    mean, std = preds.mean(0), preds.std(0)
    ens_mse = float(((mean - act) ** 2).mean())
    err = ((mean - act) ** 2).mean(-1)
    real = model.feasibility(obs, nxt)
    rng = np.random.default_rng(seed)
    other = _other_step(transitions.episode[rows], rng)
    stats = {
        "members": model.size,
        "test_transitions": int(rows.shape[0]),
        "member_mse": member_mse,
        "ensemble_mse": ens_mse,
        "mse_ratio": ens_mse / member_mse if member_mse > 0 else float("nan"),
        "spread_error_spearman": spearman(std.mean(-1), err),
        "uncertainty_error_spearman": spearman(model.uncertainty(obs, nxt).mean(-1), err),
        "auroc_other_step": auroc(real, model.feasibility(obs, nxt[other])),
    }
    state_std = model.normalizer.std.astype(np.float32)
    spread_real = -(std / model.spread_ref).mean(-1)
    for level in NOISE_LEVELS:
        noisy = nxt + level * state_std * rng.standard_normal(nxt.shape).astype(np.float32)
        stats[f"auroc_noise_{round(level * 100)}pct"] = auroc(real, model.feasibility(obs, noisy))
        if level == 0.05:  # the spread alone, for comparison with the score
            _, noisy_std = model.predict(obs, noisy, return_std=True)
            stats["auroc_spread_only_noise_5pct"] = auroc(
                spread_real, -(noisy_std / model.spread_ref).mean(-1)
            )
    return stats


def _normalized(model, obs, nxt):
    return model.normalizer.normalize(obs), model.normalizer.normalize(nxt)


def _other_step(episode, rng) -> np.ndarray:
    """For each row, another row of the same episode (a different time step), chosen at random."""
    idx = np.arange(episode.shape[0])
    other = idx.copy()
    for ep in np.unique(episode):
        where = idx[episode == ep]
        if where.shape[0] > 1:  # a random non-zero rotation: never the row itself
            other[where] = np.roll(where, int(rng.integers(1, where.shape[0])))
    return other


def ranks(x) -> np.ndarray:
    """1-based ranks, ties averaged (scipy's rankdata 'average')."""
    _, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc(positive, negative) -> float:
    """P(score of a positive > score of a negative), ties counting half (the Mann-Whitney U form)."""
    positive, negative = np.ravel(positive), np.ravel(negative)
    r = ranks(np.concatenate([positive, negative]))
    n_pos, n_neg = positive.shape[0], negative.shape[0]
    return float((r[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def attach_uncertainty(model_dir, stats: dict, protocol: str) -> dict:
    """Write `stats` (from `measure`) into params.json's "uncertainty" and the card's Uncertainty section."""
    return update_params(model_dir, **{UNCERTAINTY_KEY: {"protocol": protocol, **stats}})
