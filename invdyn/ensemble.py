"""An ensemble of K members in one model directory: member 0 is the directory's own model (what CleanDiffuser
reads), the others are `member-<i>.safetensors` beside it; predictions are the mean, the spread is the std."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import FormatError, ShapeError
from .models import ARCHITECTURES, build_model
from .pretrained import PretrainedIDM
from .weights import SAFETENSORS_FILE, _read_verified, _safetensors

#: params.json's "ensemble": {"members": [{"weights": {"file", "sha256"}, "architecture": {...}, "config":
#: {...}, "seed", "metrics": {...}}, ...], "spread_ref": [per action dim] | null, "dynamics": {"weights",
#: "precision"} | null (see fit_dynamics)}; members[0] is the
#: directory's own model (its "weights" is params.json's "weights.safetensors"). "uncertainty": {...} holds
#: what was measured on held-out episodes (see card_lines).
ENSEMBLE_KEY = "ensemble"
UNCERTAINTY_KEY = "uncertainty"


#: the error model's weights beside the members (see ErrorModel); params.json's "ensemble.error_model":
#: {"file", "sha256", "in_dim", "hidden", "fitted_on"}
ERROR_MODEL_FILE = "error_model.safetensors"


def member_file(index: int) -> str:
    return f"member-{index}.safetensors"


class ErrorModel(nn.Module):
    """Per action dimension, the log of the expected squared error of the members' mean, from the pair and
    the members' spread (`error_features`). Fitted on validation pairs, which no member trained on: seeds
    that disagree little can still all be wrong where the data is ambiguous, and this term says so."""

    def __init__(self, in_dim: int, act_dim: int, hidden: int = 128):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, act_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.feature_mean) / self.feature_std)


def error_features(obs_n, next_n, mean, std, spread_ref) -> np.ndarray:
    """The error model's input: normalized s, s' - s, log spread (relative to real pairs') and the mean
    action; numpy arrays with any leading shape."""
    log_spread = np.log(np.asarray(std, dtype=np.float64) / spread_ref + 1e-6)
    parts = [obs_n, np.asarray(next_n) - np.asarray(obs_n), log_spread, mean]
    return np.concatenate([np.asarray(x, dtype=np.float32) for x in parts], -1)


def _as_numpy_pair(obs, next_obs):
    """(obs, next_obs) as numpy (next_obs float32) and whether obs is a tensor (answers go back as one)."""
    is_tensor = isinstance(obs, torch.Tensor)
    o = obs.detach().cpu().numpy() if is_tensor else np.asarray(obs, dtype=np.float32)
    n = next_obs.detach().cpu().numpy() if isinstance(next_obs, torch.Tensor) else np.asarray(next_obs)
    return o, n.astype(np.float32), is_tensor


class EnsembleIDM(PretrainedIDM):
    """What `invdyn.load` returns for an ensemble directory: `predict` is the members' mean,
    `predict(..., return_std=True)` gives (mean, std), `feasibility` one plausibility score per pair."""

    def __init__(
        self, nets, normalizer, params: dict, card: str = "", path=None, source=None, error_model=None
    ):
        super().__init__(nets[0], normalizer, params, card=card, path=path, source=source)
        self.error_model = error_model.eval() if error_model is not None else None
        self.members = nn.ModuleList(list(nets))
        self.members.eval()
        entry = params.get(ENSEMBLE_KEY) or {}
        ref = entry.get("spread_ref")
        # per-dimension spread typical of real pairs: the spread weighs each action dimension alike
        self.spread_ref = np.asarray(ref if ref else np.ones(self.act_dim), dtype=np.float64)
        self.dynamics = _checked_dynamics(entry.get("dynamics"), self.obs_dim, self.act_dim, path)

    @property
    def size(self) -> int:
        return len(self.members)

    @torch.no_grad()
    def predict_normalized(self, obs, next_obs, *, normalizer=None, return_std: bool = False):
        """The members' mean for normalized observations; with `return_std`, (mean, std per action dim)."""
        if normalizer is not None:
            from .planner_norms import to_raw

            return self.predict(to_raw(normalizer, obs), to_raw(normalizer, next_obs), return_std=return_std)
        outs = [net.predict(obs, next_obs) for net in self.members]
        if isinstance(outs[0], torch.Tensor):
            stacked = torch.stack(outs)
            mean, std = stacked.mean(0), stacked.std(0, unbiased=False)
        else:
            stacked = np.stack(outs)
            mean, std = stacked.mean(0), stacked.std(0)
        return (mean, std) if return_std else mean

    @torch.no_grad()
    def uncertainty(self, obs, next_obs):
        """Per action dimension, the predicted std of `predict`'s error for raw pairs (any leading shape):
        sqrt(members' spread² + the error model's variance). Without an error model (an ensemble written
        without data): the members' spread alone, as `predict(..., return_std=True)` gives it."""
        o, n, is_tensor = _as_numpy_pair(obs, next_obs)
        mean, std = self.predict(o, n, return_std=True)
        if self.error_model is None:
            total = np.asarray(std, dtype=np.float32)
        else:
            nz = self.normalizer
            x = error_features(nz.normalize(o), nz.normalize(n), mean, std, self.spread_ref)
            log_var = self.error_model(torch.from_numpy(x)).double().numpy()
            total = np.sqrt(np.square(std, dtype=np.float64) + np.exp(log_var)).astype(np.float32)
        return torch.from_numpy(total).to(obs.device) if is_tensor else total

    @torch.no_grad()
    def feasibility(self, obs, next_obs):
        """One score per (obs, next_obs) pair of raw observations, any leading shape; higher = more plausible.

        With the recorded one-step model ("dynamics", fitted on the members' training pairs): minus the
        squared Mahalanobis distance, per state dimension, of next_obs from what the ensemble's mean action
        would give from obs (real pairs score about -1). Without it: minus the members' spread, each action
        dimension divided by its typical spread on real pairs."""
        o, n, is_tensor = _as_numpy_pair(obs, next_obs)
        mean, std = self.predict(o, n, return_std=True)
        if self.dynamics is None:
            score = -(std / self.spread_ref).mean(-1)
        else:
            weights, precision = self.dynamics
            o_n, n_n = self.normalizer.normalize(o), self.normalizer.normalize(n)
            x = np.concatenate([o_n, mean, np.ones((*o_n.shape[:-1], 1), np.float32)], -1).astype(np.float64)
            r = n_n - x @ weights
            score = -np.einsum("...i,ij,...j->...", r, precision, r) / self.obs_dim
        score = np.asarray(score, dtype=np.float32)
        return torch.from_numpy(score).to(obs.device) if is_tensor else score

    def __repr__(self) -> str:
        return (
            f"EnsembleIDM(name={self.name!r}, members={self.size}, obs_dim={self.obs_dim}, "
            f"act_dim={self.act_dim}, source={self.source!r})"
        )


def fit_dynamics(obs_n, act, next_n) -> dict:
    """params.json's "ensemble.dynamics": a linear one-step model next_obs_n ~ [obs_n, act, 1] @ weights
    (least squares, normalized states) and the precision matrix of its residuals."""
    x = np.concatenate([obs_n, act, np.ones((obs_n.shape[0], 1))], 1).astype(np.float64)
    y = np.asarray(next_n, dtype=np.float64)
    weights, *_ = np.linalg.lstsq(x, y, rcond=None)
    res = y - x @ weights
    cov = np.atleast_2d(np.cov(res.T))
    # a state dimension the model predicts exactly would make the covariance singular
    cov += np.eye(cov.shape[0]) * max(1e-6 * float(np.trace(cov)) / cov.shape[0], 1e-12)
    return {"weights": weights.tolist(), "precision": np.linalg.inv(cov).tolist()}


def _checked_dynamics(dynamics, obs_dim: int, act_dim: int, path):
    if dynamics is None:
        return None
    where = f"{Path(path) / 'params.json' if path else 'params.json'}: 'ensemble.dynamics'"
    try:
        weights = np.asarray(dynamics["weights"], dtype=np.float64)
        precision = np.asarray(dynamics["precision"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{where} must hold 'weights' and 'precision' (numeric matrices)") from None
    if weights.shape != (obs_dim + act_dim + 1, obs_dim) or precision.shape != (obs_dim, obs_dim):
        raise FormatError(
            f"{where}: 'weights' {weights.shape} / 'precision' {precision.shape} must be "
            f"({obs_dim + act_dim + 1}, {obs_dim}) / ({obs_dim}, {obs_dim}) for obs_dim {obs_dim}"
        )
    if not (np.isfinite(weights).all() and np.isfinite(precision).all()):
        raise FormatError(f"{where} holds non-finite numbers; re-make the ensemble")
    return weights, precision


def check_compatible(members: list[PretrainedIDM], names: list) -> None:
    """Raise FormatError naming the member unless all have member 0's dims, normalizer and dataset."""
    if len(members) < 2:
        raise FormatError(f"an ensemble needs at least 2 members, got {len(members)}")
    first = members[0]
    sha = (first.params.get("dataset") or {}).get("sha256")
    for model, name in zip(members[1:], names[1:], strict=True):
        if (model.obs_dim, model.act_dim) != (first.obs_dim, first.act_dim):
            raise ShapeError(
                f"ensemble member {name}: obs_dim/act_dim {model.obs_dim}/{model.act_dim} differ from "
                f"{names[0]}'s {first.obs_dim}/{first.act_dim}; members must be trained on the same data"
            )
        same = np.allclose(
            model.normalizer.mean, first.normalizer.mean, rtol=1e-6, atol=1e-7
        ) and np.allclose(model.normalizer.std, first.normalizer.std, rtol=1e-6, atol=1e-7)
        if not same:
            raise FormatError(
                f"ensemble member {name}: its normalizer differs from {names[0]}'s; all members must share "
                "one normalizer (train them on the same dataset)"
            )
        other = (model.params.get("dataset") or {}).get("sha256")
        if sha and other and other != sha:
            raise FormatError(
                f"ensemble member {name}: dataset sha256 {other[:12]} differs from {names[0]}'s {sha[:12]}; "
                "members must be trained on the same data"
            )


def write_member(folder: Path, index: int, model: PretrainedIDM) -> dict:
    """Write member `index`'s weights (safetensors only: CleanDiffuser reads member 0) and return its
    params.json entry; member 0's entry points at the directory's own weights, written elsewhere."""
    net = model.net
    entry = {
        "architecture": {"name": net.arch_name, **net.options},
        "config": net.config,
        "seed": (model.params.get("training") or {}).get("seed"),
        "metrics": {
            k: v for k, v in (model.params.get("metrics") or {}).items() if not isinstance(v, (dict, list))
        },
    }
    if index == 0:
        return {"weights": dict(model.params["weights"]["safetensors"]), **entry}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    data = _safetensors().save(state, metadata={"format": "pt"})
    (folder / member_file(index)).write_bytes(data)
    return {"weights": {"file": member_file(index), "sha256": hashlib.sha256(data).hexdigest()}, **entry}


def read_members(model_dir: Path, params: dict, first: PretrainedIDM, device="cpu") -> EnsembleIDM:
    """The ensemble of a directory whose params.json has "ensemble"; each member's weights are checked
    against their sha256 before they are parsed."""
    where = Path(model_dir) / "params.json"
    members = (
        (params.get(ENSEMBLE_KEY) or {}).get("members")
        if isinstance(params.get(ENSEMBLE_KEY), dict)
        else None
    )
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise FormatError(f"{where}: 'ensemble.members' must be a list of at least 2 member objects")
    own = (params.get("weights") or {}).get("safetensors") or {}
    if (members[0].get("weights") or {}).get("file") != own.get("file", SAFETENSORS_FILE):
        raise FormatError(
            f"{where}: 'ensemble.members[0]' must be the directory's own model ({SAFETENSORS_FILE})"
        )
    nets = [first.net]
    for i, member in enumerate(members[1:], 1):
        net = _read_member(Path(model_dir), member, f"{where}: 'ensemble.members[{i}]'")
        if (net.obs_dim, net.act_dim) != (first.obs_dim, first.act_dim):
            raise ShapeError(
                f"{where}: 'ensemble.members[{i}]' has obs_dim/act_dim {net.obs_dim}/{net.act_dim}, member 0 "
                f"{first.obs_dim}/{first.act_dim}; every member must fit the same data"
            )
        nets.append(net.eval().to(device))
    error = _read_error_model(Path(model_dir), params[ENSEMBLE_KEY].get("error_model"), where, first)
    return EnsembleIDM(nets, first.normalizer, params, card=first.card, path=first.path, error_model=error)


def error_model_entry(model: ErrorModel, folder: Path, **extra) -> dict:
    """Write the error model's weights into `folder` and return its params.json entry."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    data = _safetensors().save(state, metadata={"format": "pt"})
    tmp = folder / f".{ERROR_MODEL_FILE}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / ERROR_MODEL_FILE)
    in_dim, hidden = model.net[0].in_features, model.net[0].out_features
    sha = hashlib.sha256(data).hexdigest()
    return {"file": ERROR_MODEL_FILE, "sha256": sha, "in_dim": in_dim, "hidden": hidden, **extra}


def _read_error_model(model_dir: Path, entry, where, first: PretrainedIDM):
    if entry is None:
        return None
    field = f"{where}: 'ensemble.error_model'"
    in_dim = 2 * (first.obs_dim + first.act_dim)
    if not isinstance(entry, dict) or entry.get("file") != ERROR_MODEL_FILE or not entry.get("sha256"):
        raise FormatError(f'{field} must be {{"file": "{ERROR_MODEL_FILE}", "sha256": hex, ...}}')
    hidden = entry.get("hidden")
    if entry.get("in_dim") != in_dim or not isinstance(hidden, int) or not 0 < hidden <= 4096:
        raise FormatError(f"{field}: 'in_dim' must be {in_dim} (2 x (obs_dim + act_dim)) and 'hidden' 1-4096")
    path = model_dir / ERROR_MODEL_FILE
    data = _read_verified(path, entry["sha256"])
    try:
        state = _safetensors().load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        raise FormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    model = ErrorModel(in_dim, first.act_dim, hidden)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ShapeError(f"{path}: weights do not fit {field} ({e})") from None
    return model


def _read_member(model_dir: Path, member: dict, where: str) -> nn.Module:
    weights, arch, config = member.get("weights"), member.get("architecture"), member.get("config")
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) or not weights.get("sha256"):
        raise FormatError(f'{where}: \'weights\' must be {{"file": name, "sha256": hex}}')
    if Path(weights["file"]).name != weights["file"] or not weights["file"].endswith(".safetensors"):
        raise FormatError(f"{where}: 'weights.file' must be a plain *.safetensors file name")
    if not isinstance(arch, dict) or arch.get("name") not in ARCHITECTURES or not isinstance(config, dict):
        raise FormatError(
            f"{where}: needs 'architecture' (a known name) and 'config' (constructor arguments)"
        )
    options = {k: v for k, v in arch.items() if k != "name"}
    try:
        with torch.device("meta"):  # shapes only: a crafted config cannot exhaust memory
            shapes = build_model(arch["name"], config, options)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise FormatError(f"{where}: 'config' does not build a {arch['name']} model: {e}") from None
    path = model_dir / weights["file"]
    data = _read_verified(path, weights["sha256"])
    try:
        state = _safetensors().load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        raise FormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        wrong = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise ShapeError(f"{path}: weights do not fit {where}'s config (keys/shapes differ: {wrong[:5]})")
    net = build_model(arch["name"], config, options)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise FormatError(f"{path}: weights cannot be loaded into the model ({e})") from None
    return net


def card_lines(params: dict) -> list[str]:
    """The card's "Ensemble" and "Uncertainty" sections (none for a single model)."""
    ens = params.get(ENSEMBLE_KEY)
    if not isinstance(ens, dict) or not isinstance(ens.get("members"), list):
        return []
    lines = [
        "",
        "## Ensemble",
        "",
        f"{len(ens['members'])} members; `predict` is their mean, `predict(o, o2, return_std=True)` gives "
        "(mean, std per action dimension), `feasibility(o, o2)` one plausibility score per pair (higher = "
        "more plausible). Each member's held-out MSE is on its own validation episodes (its seed's split)."
        + (
            " `uncertainty(o, o2)` gives the predicted std of the error per action dimension: the spread "
            "combined with an error model fitted on validation pairs."
            if isinstance(ens.get("error_model"), dict)
            else ""
        ),
        "",
        "| member | weights | seed | heldout_mse |",
        "|---|---|---|---|",
    ]
    for i, m in enumerate(ens["members"]):
        if isinstance(m, dict):
            mse = (m.get("metrics") or {}).get("heldout_mse")
            mse = f"{mse:.6g}" if isinstance(mse, float) else "-"
            lines.append(f"| {i} | `{(m.get('weights') or {}).get('file')}` | {m.get('seed')} | {mse} |")
    unc = params.get(UNCERTAINTY_KEY)
    if isinstance(unc, dict) and unc:
        lines += [
            "",
            "## Uncertainty",
            "",
            str(unc.get("protocol", "")),
            "",
            "| measure | value |",
            "|---|---|",
        ]
        for k, v in unc.items():
            if k != "protocol" and not isinstance(v, (dict, list)):
                lines.append(f"| {k} | {f'{v:.4g}' if isinstance(v, float) else v} |")
    return lines
